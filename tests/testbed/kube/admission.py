"""What the real API server does to a Job or Deployment before storing it: defaulting, validation and
immutability, answered with the same 422 `Status` bodies (reason Invalid, details.causes per field).

Covers the fields the product and the runbook write; other kinds pass through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from tests.testbed.kube import openapi
from tests.testbed.kube.store import RESOURCES, ResourceInfo, Store, StoreError

__all__ = ["VALIDATED", "default", "validate_create", "validate_update"]

Obj = dict[str, Any]
VALIDATED = frozenset({"jobs", "deployments"})
_GROUPS = {"jobs": ("Job", "batch"), "deployments": ("Deployment", "apps")}


class _Causes:
    def __init__(self, resource: str, name: str) -> None:
        self.resource = resource
        self.name = name
        self.causes: list[dict[str, str]] = []

    def add(self, field: str, reason: str, message: str) -> None:
        self.causes.append({"reason": reason, "message": message, "field": field})

    def raise_if_any(self) -> None:
        if not self.causes:
            return
        kind, group = _GROUPS[self.resource]
        listed = ", ".join(f"{c['field']}: {c['message']}" for c in self.causes)
        text = f"[{listed}]" if len(self.causes) > 1 else listed
        raise StoreError(
            422,
            "Invalid",
            f'{kind}.{group} "{self.name}" is invalid: {text}',
            details={"name": self.name, "group": group, "kind": kind, "causes": self.causes},
        )


def _go(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# -- defaulting --------------------------------------------------------------------------------------


def _default_pod_spec(spec: Obj, *, restart_policy: str) -> None:
    spec.setdefault("restartPolicy", restart_policy)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if not isinstance(container, dict):
            continue
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = str(container.get("image") or "")
        tag = image.rsplit("/", 1)[-1]
        container.setdefault(
            "imagePullPolicy", "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent"
        )
        container.setdefault("resources", {})


def default(resource: str, obj: Obj) -> None:
    """Fill the fields the real server defaults (in place)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    template = spec.get("template")
    if resource == "jobs":
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            _default_pod_spec(template["spec"], restart_policy="Never")
    elif resource == "deployments":
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
        if isinstance(strategy, dict) and strategy.get("type", "RollingUpdate") == "RollingUpdate":
            strategy.setdefault("type", "RollingUpdate")
            rolling = strategy.setdefault("rollingUpdate", {})
            if isinstance(rolling, dict):
                rolling.setdefault("maxUnavailable", "25%")
                rolling.setdefault("maxSurge", "25%")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            _default_pod_spec(template["spec"], restart_policy="Always")


def set_job_selector(job: Obj, uid: str) -> None:
    """The job strategy's generated selector and template labels (unless spec.manualSelector)."""
    spec = job.get("spec")
    if not isinstance(spec, dict) or spec.get("manualSelector"):
        return
    name = str((job.get("metadata") or {}).get("name") or "")
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    template = spec.setdefault("template", {})
    if isinstance(template, dict):
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )


# -- validation --------------------------------------------------------------------------------------


def _validate_pod_template(errs: _Causes, template: Any, *, job: bool) -> None:
    path = "spec.template"
    if not isinstance(template, dict):
        errs.add(path, "FieldValueRequired", "Required value")
        return
    spec = template.get("spec")
    if not isinstance(spec, dict):
        errs.add(f"{path}.spec", "FieldValueRequired", "Required value")
        return
    containers = spec.get("containers")
    if not containers:
        errs.add(f"{path}.spec.containers", "FieldValueRequired", "Required value")
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            where = f"{path}.spec.{group}[{i}]"
            if not isinstance(c, dict):
                errs.add(where, "FieldValueInvalid", "Invalid value: must be an object")
                continue
            name = c.get("name")
            if not name:
                errs.add(f"{where}.name", "FieldValueRequired", "Required value")
            elif name in seen:
                errs.add(f"{where}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"')
            else:
                seen.add(str(name))
            if not c.get("image"):
                errs.add(f"{where}.image", "FieldValueRequired", "Required value")
    restart = spec.get("restartPolicy")
    if job and restart not in ("Never", "OnFailure"):
        errs.add(
            f"{path}.spec.restartPolicy",
            "FieldValueNotSupported",
            f'Unsupported value: "{restart}": supported values: "OnFailure", "Never"',
        )


def _validate(resource: str, obj: Obj, name: str) -> _Causes:
    errs = _Causes(resource, name)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        errs.add("spec", "FieldValueRequired", "Required value")
        return errs
    if resource == "jobs":
        for field in (
            "backoffLimit",
            "parallelism",
            "completions",
            "ttlSecondsAfterFinished",
            "activeDeadlineSeconds",
        ):
            value = spec.get(field)
            if value is not None and (not isinstance(value, int) or value < 0):
                errs.add(
                    f"spec.{field}",
                    "FieldValueInvalid",
                    f"Invalid value: {_go(value)}: must be greater than or equal to 0",
                )
        _validate_pod_template(errs, spec.get("template"), job=True)
    elif resource == "deployments":
        replicas = spec.get("replicas")
        if replicas is not None and (not isinstance(replicas, int) or replicas < 0):
            errs.add(
                "spec.replicas",
                "FieldValueInvalid",
                f"Invalid value: {_go(replicas)}: must be greater than or equal to 0",
            )
        selector = (
            (spec.get("selector") or {}).get("matchLabels")
            if isinstance(spec.get("selector"), dict)
            else None
        )
        if not spec.get("selector"):
            errs.add("spec.selector", "FieldValueRequired", "Required value")
        template = spec.get("template")
        labels = (
            ((template or {}).get("metadata") or {}).get("labels") or {} if isinstance(template, dict) else {}
        )
        if selector and any(labels.get(k) != v for k, v in selector.items()):
            errs.add(
                "spec.template.metadata.labels",
                "FieldValueInvalid",
                f"Invalid value: {_go(labels)}: `selector` does not match template `labels`",
            )
        _validate_pod_template(errs, template, job=False)
    return errs


def check_fields(info: ResourceInfo, obj: Obj) -> None:
    """`fieldValidation=Strict` (kubectl's default): a field the schema lacks is a 400, as the decoder says."""
    # status is the controllers' (never a client's), so only what a client sends is checked
    unknown = openapi.unknown_fields(info, {k: v for k, v in obj.items() if k != "status"})
    if not unknown:
        return
    what = "; ".join(f'unknown field "{u}"' for u in unknown)
    raise StoreError(
        400,
        "BadRequest",
        f'{info.kind} in version "{info.version}" cannot be handled as a {info.kind}: strict decoding error: {what}',
    )


def validate_create(resource: str, obj: Obj, store: Store, *, strict: bool = False) -> None:
    if strict:
        check_fields(RESOURCES[resource], obj)
    if resource not in VALIDATED:
        return
    name = str(
        (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName") or ""
    )
    _validate(resource, obj, name).raise_if_any()


def validate_update(resource: str, new: Obj, old: Obj, *, strict: bool = False) -> None:
    if strict:
        check_fields(RESOURCES[resource], new)
    if resource not in VALIDATED:
        return
    name = str(old["metadata"]["name"])
    errs = _validate(resource, new, name)
    new_spec, old_spec = new.get("spec") or {}, old.get("spec") or {}
    if resource == "jobs":
        if new_spec.get("template") != old_spec.get("template"):
            errs.add(
                "spec.template",
                "FieldValueInvalid",
                f"Invalid value: {_go(new_spec.get('template'))}: field is immutable",
            )
        if new_spec.get("selector") != old_spec.get("selector"):
            errs.add(
                "spec.selector",
                "FieldValueInvalid",
                f"Invalid value: {_go(new_spec.get('selector'))}: field is immutable",
            )
        if new_spec.get("completions") != old_spec.get("completions"):
            errs.add(
                "spec.completions",
                "FieldValueInvalid",
                f"Invalid value: {_go(new_spec.get('completions'))}: field is immutable",
            )
    elif resource == "deployments" and new_spec.get("selector") != old_spec.get("selector"):
        errs.add(
            "spec.selector",
            "FieldValueInvalid",
            f"Invalid value: {_go(new_spec.get('selector'))}: field is immutable",
        )
    errs.raise_if_any()
