"""OpenAPI v3 documents for the fake API server, so `kubectl apply` (field validation) and `kubectl explain` work.

The schemas are generated from kubernetes_asyncio's models, which its generator built from the real
Kubernetes OpenAPI spec: field names, types, descriptions and required fields are the real ones. Patch
merge keys (which the Python models do not carry) are added for the lists strategic merge patches key
by name. Argo CD's Application is a CRD with a structural schema that preserves unknown fields, as
its real CRD does for most of its tree.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from typing import Any

from kubernetes_asyncio.client import models

from tests.testbed.kube.store import RESOURCES, ResourceInfo

__all__ = ["document", "index", "known_fields"]

Obj = dict[str, Any]

# python model -> (schema package, schema name) for the kinds served; other models go by their name
_TOP: dict[str, tuple[str, str, str]] = {
    "Job": ("V1Job", "io.k8s.api.batch.v1", "Job"),
    "Deployment": ("V1Deployment", "io.k8s.api.apps.v1", "Deployment"),
    "ReplicaSet": ("V1ReplicaSet", "io.k8s.api.apps.v1", "ReplicaSet"),
    "Pod": ("V1Pod", "io.k8s.api.core.v1", "Pod"),
    "Event": ("CoreV1Event", "io.k8s.api.core.v1", "Event"),
    "Secret": ("V1Secret", "io.k8s.api.core.v1", "Secret"),
    "ServiceAccount": ("V1ServiceAccount", "io.k8s.api.core.v1", "ServiceAccount"),
    "Namespace": ("V1Namespace", "io.k8s.api.core.v1", "Namespace"),
    "Node": ("V1Node", "io.k8s.api.core.v1", "Node"),
}
_META = {
    "V1ObjectMeta",
    "V1LabelSelector",
    "V1LabelSelectorRequirement",
    "V1OwnerReference",
    "V1ManagedFieldsEntry",
    "V1Condition",
    "V1ListMeta",
}
_MERGE_KEYS = {
    "containers": "name",
    "init_containers": "name",
    "ephemeral_containers": "name",
    "env": "name",
    "volumes": "name",
    "volume_mounts": "mountPath",
    "ports": "containerPort",
    "image_pull_secrets": "name",
    "owner_references": "uid",
    "conditions": "type",
}


def _schema_name(model: str) -> str:
    for py, package, name in _TOP.values():
        if py == model:
            return f"{package}.{name}"
    short = re.sub(r"^(CoreV1|V1beta\d|V1alpha\d|V1|V2)", "", model)
    if model in _META:
        return f"io.k8s.apimachinery.pkg.apis.meta.v1.{short}"
    if re.match(r"(Job|CronJob|PodFailurePolicy|SuccessPolicy|UncountedTerminatedPods)", short):
        return f"io.k8s.api.batch.v1.{short}"
    if re.match(r"(Deployment|ReplicaSet|RollingUpdateDeployment)", short):
        return f"io.k8s.api.apps.v1.{short}"
    return f"io.k8s.api.core.v1.{short}"


def _description(cls: type, attr: str) -> str:
    doc = getattr(getattr(cls, attr, None), "__doc__", None) or ""
    parts = [p.strip() for p in doc.split("\n\n")]
    text = parts[1] if len(parts) > 1 and not parts[1].startswith(":return") else ""
    return text.replace("  # noqa: E501", "").strip()


def _required(cls: type, attr: str) -> bool:
    prop = getattr(cls, attr, None)
    setter = getattr(prop, "fset", None)
    if setter is None:
        return False
    try:
        return "must not be `None`" in inspect.getsource(setter)
    except (OSError, TypeError):
        return False


def _type_schema(type_name: str, out: dict[str, Obj]) -> Obj:
    if type_name.startswith("list["):
        return {"type": "array", "items": _type_schema(type_name[5:-1], out)}
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(",", 1)[1].strip()
        return {"type": "object", "additionalProperties": _type_schema(inner, out)}
    simple = {
        "str": {"type": "string"},
        "int": {"type": "integer", "format": "int32"},
        "bool": {"type": "boolean"},
        "float": {"type": "number", "format": "double"},
        "datetime": {"type": "string", "format": "date-time"},
        "date": {"type": "string", "format": "date"},
        "object": {"x-kubernetes-int-or-string": True},
    }
    if type_name in simple:
        return dict(simple[type_name])
    _model_schema(type_name, out)
    return {"allOf": [{"$ref": f"#/components/schemas/{_schema_name(type_name)}"}]}


def _model_schema(model: str, out: dict[str, Obj]) -> None:
    name = _schema_name(model)
    if name in out:
        return
    cls = getattr(models, model, None)
    if cls is None:
        out[name] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return
    out[name] = {}  # placeholder against recursion (JSONSchemaProps-style cycles)
    props: Obj = {}
    required: list[str] = []
    for attr, type_name in cls.openapi_types.items():
        json_name = cls.attribute_map[attr]
        prop = _type_schema(type_name, out)
        description = _description(cls, attr)
        if description:
            prop["description"] = description
        if attr in _MERGE_KEYS and prop.get("type") == "array":
            prop["x-kubernetes-patch-merge-key"] = _MERGE_KEYS[attr]
            prop["x-kubernetes-patch-strategy"] = "merge"
            prop["x-kubernetes-list-type"] = "map"
            prop["x-kubernetes-list-map-keys"] = [_MERGE_KEYS[attr]]
        props[json_name] = prop
        if _required(cls, attr):
            required.append(json_name)
    doc = (cls.__doc__ or "").strip()
    schema: Obj = {"type": "object", "properties": props}
    if doc and not doc.startswith("NOTE:"):
        schema["description"] = doc
    if required:
        schema["required"] = required
    out[name] = schema


_APPLICATION: Obj = {
    "description": "Application is a definition of Application resource.",
    "type": "object",
    "required": ["metadata", "spec"],
    "properties": {
        "apiVersion": {
            "type": "string",
            "description": "APIVersion defines the versioned schema of this representation of an object.",
        },
        "kind": {
            "type": "string",
            "description": "Kind is a string value representing the REST resource this object represents.",
        },
        "metadata": {
            "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]
        },
        "operation": {
            "description": "Operation contains information about a requested or running operation",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        },
        "spec": {
            "description": "ApplicationSpec represents desired application state. Contains link to repository with application definition and additional parameters link definition revision.",
            "type": "object",
            "required": ["destination", "project"],
            "properties": {
                "project": {
                    "type": "string",
                    "description": "Project is a reference to the project this application belongs to. The empty string means that application belongs to the 'default' project.",
                },
                "source": {
                    "type": "object",
                    "description": "Source is a reference to the location of the application's manifests or chart",
                    "required": ["repoURL"],
                    "properties": {
                        "repoURL": {
                            "type": "string",
                            "description": "RepoURL is the URL to the repository (Git or Helm) that contains the application manifests",
                        },
                        "path": {
                            "type": "string",
                            "description": "Path is a directory path within the Git repository, and is only valid for applications sourced from Git.",
                        },
                        "targetRevision": {
                            "type": "string",
                            "description": "TargetRevision defines the revision of the source to sync the application to.",
                        },
                    },
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "destination": {
                    "type": "object",
                    "description": "Destination is a reference to the target Kubernetes server and namespace",
                    "properties": {
                        "server": {
                            "type": "string",
                            "description": "Server specifies the URL of the target cluster's Kubernetes control plane API. This must be set if Name is not set.",
                        },
                        "namespace": {
                            "type": "string",
                            "description": "Namespace specifies the target namespace for the application's resources.",
                        },
                        "name": {
                            "type": "string",
                            "description": "Name is an alternate way of specifying the target cluster by its symbolic name. This must be set if Server is not set.",
                        },
                    },
                },
                "syncPolicy": {
                    "type": "object",
                    "description": "SyncPolicy controls when and how a sync will be performed",
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            },
            "x-kubernetes-preserve-unknown-fields": True,
        },
        "status": {
            "type": "object",
            "description": "ApplicationStatus contains status information for the application",
            "x-kubernetes-preserve-unknown-fields": True,
        },
    },
    "x-kubernetes-group-version-kind": [
        {"group": "argoproj.io", "kind": "Application", "version": "v1alpha1"}
    ],
}


def _gv_key(info: ResourceInfo) -> str:
    return f"apis/{info.group}/{info.version}" if info.group else f"api/{info.version}"


_QUERY = [
    ("dryRun", "When present, indicates that modifications should not be persisted."),
    (
        "fieldManager",
        "fieldManager is a name associated with the actor or entity that is making these changes.",
    ),
    (
        "fieldValidation",
        "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing "
        "unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
    ),
]


def _paths(infos: list[ResourceInfo]) -> Obj:
    paths: Obj = {}
    for info in infos:
        gvk = {"group": info.group, "version": info.version, "kind": info.kind}
        scope = "/namespaces/{namespace}" if info.namespaced else ""
        base = f"/{_gv_key(info)}{scope}/{info.plural}"
        params = [
            {"name": n, "in": "query", "description": d, "schema": {"type": "string", "uniqueItems": True}}
            for n, d in _QUERY
        ]
        op = {
            "x-kubernetes-group-version-kind": gvk,
            "parameters": params,
            "responses": {"200": {"description": "OK"}},
        }
        paths[base] = {"post": {**op, "x-kubernetes-action": "post", "operationId": f"create{info.kind}"}}
        paths[base + "/{name}"] = {
            "get": {**op, "x-kubernetes-action": "get", "operationId": f"read{info.kind}", "parameters": []},
            "put": {**op, "x-kubernetes-action": "put", "operationId": f"replace{info.kind}"},
            "patch": {**op, "x-kubernetes-action": "patch", "operationId": f"patch{info.kind}"},
            "delete": {
                **op,
                "x-kubernetes-action": "delete",
                "operationId": f"delete{info.kind}",
                "parameters": params[:1],
            },
        }
    return paths


@functools.cache
def _documents() -> dict[str, str]:
    by_gv: dict[str, list[ResourceInfo]] = {}
    for info in RESOURCES.values():
        by_gv.setdefault(_gv_key(info), []).append(info)
    docs: dict[str, str] = {}
    for gv, infos in by_gv.items():
        schemas: dict[str, Obj] = {}
        for info in infos:
            if info.custom:
                _model_schema("V1ObjectMeta", schemas)
                schemas[f"io.argoproj.{info.version}.{info.kind}"] = _APPLICATION
                continue
            py = _TOP[info.kind][0]
            _model_schema(py, schemas)
            schema = schemas[_schema_name(py)]
            schema["x-kubernetes-group-version-kind"] = [
                {"group": info.group, "kind": info.kind, "version": info.version}
            ]
        doc = {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.33.0"},
            "paths": _paths(infos),
            "components": {"schemas": schemas},
        }
        docs[gv] = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    return docs


def index(prefix: str) -> Obj:
    """The /openapi/v3 discovery document; each URL names the document's hash as the real one does."""
    return {
        "paths": {
            gv: {
                "serverRelativeURL": f"{prefix}/openapi/v3/{gv}?hash="
                + hashlib.sha512(text.encode()).hexdigest()[:128].upper()
            }
            for gv, text in _documents().items()
        }
    }


def document(gv: str) -> Obj | None:
    text = _documents().get(gv.strip("/"))
    return json.loads(text) if text is not None else None


def known_fields(gv: str) -> dict[str, Obj]:
    """The schemas of one group-version, by name (for strict field validation)."""
    doc = document(gv) or {}
    return dict((doc.get("components") or {}).get("schemas") or {})


def unknown_fields(info: ResourceInfo, obj: Obj) -> list[str]:
    """The paths of fields the kind's schema does not have (what `fieldValidation=Strict` refuses)."""
    doc = document(_gv_key(info)) or {}
    schemas: dict[str, Obj] = (doc.get("components") or {}).get("schemas") or {}
    root = next(
        (
            s
            for s in schemas.values()
            if any(g.get("kind") == info.kind for g in s.get("x-kubernetes-group-version-kind") or [])
        ),
        None,
    )
    out: list[str] = []

    def resolve(schema: Obj) -> Obj:
        while True:
            ref = schema.get("$ref") or next((a.get("$ref") for a in schema.get("allOf") or []), None)
            if not ref:
                return schema
            schema = schemas.get(ref.rsplit("/", 1)[-1], {})

    def walk(value: Any, schema: Obj, path: str) -> None:
        schema = resolve(schema)
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return
        if isinstance(value, dict):
            if "properties" in schema:
                props = schema["properties"]
                for key, item in value.items():
                    where = f"{path}.{key}" if path else key
                    if key in props:
                        walk(item, props[key], where)
                    elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                        out.append(where)
            elif isinstance(schema.get("additionalProperties"), dict):
                for key, item in value.items():
                    walk(item, schema["additionalProperties"], f"{path}[{key}]")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                walk(item, schema["items"], f"{path}[{i}]")

    if root is not None:
        walk(obj, root, "")
    return out
