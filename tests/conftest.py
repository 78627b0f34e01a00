"""Shared pytest set-up: the test-bed parts are plugins so any test can ask for them by fixture name."""

pytest_plugins = [
    "tests.testbed.registry",
    "tests.testbed.gitrepos",
    "tests.testbed.slack",
    "tests.testbed.kube.fixtures",
    "tests.testbed.kube.cluster",
    "tests.testbed.clusterops",
    "tests.testbed.sandbox",
    "tests.testbed.events",
    "tests.testbed.botrun",
    "tests.testbed.scenario",
]
