"""Just enough of Kubernetes' protobuf wire format to read a SelfSubjectAccessReview (kubectl auth can-i sends
one as `application/vnd.kubernetes.protobuf`): the `k8s\\0` envelope, runtime.Unknown, and the review's fields.
"""

from __future__ import annotations

from typing import Any

__all__ = ["decode_self_subject_access_review"]

_MAGIC = b"k8s\x00"


def _fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Top-level fields of one message: varints as ints, length-delimited as bytes."""
    out: dict[int, list[bytes | int]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(data):
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.setdefault(number, []).append(varint())
        elif wire == 2:
            size = varint()
            out.setdefault(number, []).append(data[i : i + size])
            i += size
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _text(fields: dict[int, list[bytes | int]], number: int) -> str:
    values = fields.get(number) or []
    value = values[-1] if values else b""
    return value.decode() if isinstance(value, bytes) else str(value)


def _message(fields: dict[int, list[bytes | int]], number: int) -> dict[int, list[bytes | int]]:
    values = fields.get(number) or []
    value = values[-1] if values else b""
    return _fields(value) if isinstance(value, bytes) else {}


def decode_self_subject_access_review(body: bytes) -> dict[str, Any]:
    if not body.startswith(_MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    unknown = _fields(body[len(_MAGIC) :])
    type_meta = _message(unknown, 1)
    if _text(type_meta, 2) != "SelfSubjectAccessReview":
        raise ValueError(f"expected a SelfSubjectAccessReview, got {_text(type_meta, 2)!r}")
    review = _fields(unknown[2][-1] if isinstance(unknown.get(2, [b""])[-1], bytes) else b"")  # type: ignore[arg-type]
    spec = _message(review, 2)
    spec_out: dict[str, Any] = {}
    attrs = _message(spec, 1)
    if attrs:
        names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
        spec_out["resourceAttributes"] = {
            n: _text(attrs, i + 1) for i, n in enumerate(names) if attrs.get(i + 1)
        }
    non_resource = _message(spec, 2)
    if non_resource:
        spec_out["nonResourceAttributes"] = {"path": _text(non_resource, 1), "verb": _text(non_resource, 2)}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": spec_out}
