"""Rollout: the kubectl rollout-status decision per branch (pure) and the watch with fail-fast on a simulated cluster."""

from __future__ import annotations

from typing import Any

from bot.adapters.rollout import RolloutPhase, is_new_pod, rollout_status


def deploy(
    *,
    generation: int = 2,
    observed: int = 2,
    replicas: int = 2,
    status_replicas: int = 2,
    updated: int = 2,
    available: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "funnelcake-api", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": status_replicas,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": conditions or [],
        },
    }


def test_spec_update_not_observed_is_waiting() -> None:
    st = rollout_status(deploy(generation=3, observed=2))
    assert st.phase is RolloutPhase.WAITING
    assert st.message == "Waiting for deployment spec update to be observed..."


def test_progress_deadline_exceeded_is_failed_even_if_counts_look_done() -> None:
    cond = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    st = rollout_status(deploy(conditions=cond))
    assert st.phase is RolloutPhase.FAILED
    assert "exceeded its progress deadline" in st.message


def test_deadline_checked_only_after_generation_observed() -> None:
    cond = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    assert rollout_status(deploy(generation=4, observed=3, conditions=cond)).phase is RolloutPhase.WAITING


def test_updated_below_replicas_is_waiting() -> None:
    st = rollout_status(deploy(updated=1, status_replicas=3, available=2))
    assert st.phase is RolloutPhase.WAITING
    assert "1 out of 2 new replicas have been updated" in st.message


def test_old_replicas_pending_termination_is_waiting() -> None:
    st = rollout_status(deploy(status_replicas=3, updated=2, available=2))
    assert st.phase is RolloutPhase.WAITING
    assert "1 old replicas are pending termination" in st.message


def test_available_below_updated_is_waiting() -> None:
    st = rollout_status(deploy(available=1))
    assert st.phase is RolloutPhase.WAITING
    assert "1 of 2 updated replicas are available" in st.message


def test_done() -> None:
    st = rollout_status(deploy())
    assert st.phase is RolloutPhase.DONE
    assert (st.available, st.total) == (2, 2)
    assert st.message == 'deployment "funnelcake-api" successfully rolled out'


def test_progressing_reasons_other_than_deadline_do_not_fail() -> None:
    cond = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
    assert rollout_status(deploy(available=0, conditions=cond)).phase is RolloutPhase.WAITING


def test_new_pod_matches_template_images() -> None:
    d = {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:new"}]}}}}
    new = {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:new"}]}}
    old = {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:old"}]}}
    assert is_new_pod(new, d)
    assert not is_new_pod(old, d)
