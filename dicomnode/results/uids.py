"""Deterministic UIDs for result objects, so that a re-run replaces instead of duplicating.

A result's UID depends only on what the result is about: the source study, the
identity of the models that produced it (name and version of each), and the kind of
object (``"sr"``, ``"sr-series"``, ``"sc-series"``, ``"sc:<SOPInstanceUID>"``, a
tracking identifier, ...) with an index. Analysing the same study again with the same
models gives the same Series and SOP Instance UIDs, so the PACS replaces the earlier
objects; a new model version gives new UIDs, so results of different models never
overwrite each other.

Form: the UUID-derived UID of PS3.5 B.2, ``2.25.<decimal>``. The UUID is built from the
first 128 bits of a SHA-256 digest of the inputs, with the version bits set to 8 and
the variant bits to RFC 4122/9562 (a UUIDv8, the RFC 9562 form for name-based UUIDs
made with a hash other than MD5 or SHA-1). Such a UID has at most 44 characters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Protocol

#: Bumped only if the derivation changes (which would change every result UID).
_DERIVATION = "dicomnode-result-uid-v1"


class ModelIdentity(Protocol):
    """What :func:`result_uid` needs of a model (e.g. ``ModelUsed``)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


def uuid_uid(*parts: object) -> str:
    """The ``2.25`` UID (PS3.5 B.2) of a UUIDv8 derived from SHA-256 of ``parts``.

    ``parts`` (strings, numbers, lists of them) are serialised as JSON, so that no two
    different inputs share a serialisation; the same parts in the same order always
    give the same UID.
    """
    text = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    value = int.from_bytes(digest[:16], "big")
    value &= ~(0xF << 76)  # version: bits 76..79
    value |= 0x8 << 76
    value &= ~(0x3 << 62)  # variant: bits 62..63 = 0b10
    value |= 0x2 << 62
    return f"2.25.{value}"


def result_uid(
    study_instance_uid: str,
    models: Sequence[ModelIdentity],
    kind: str,
    index: int = 0,
) -> str:
    """The UID of one result object (or series, or tracking identifier) of a study.

    ``models`` are identified by name and version; their order does not matter.
    ``kind`` names the object, e.g. ``"sr"``, ``"sr-series"``, ``"sc-series"`` or
    ``"sc:<SOPInstanceUID of the source image>"``; ``index`` tells apart several objects
    of one kind.
    """
    if not study_instance_uid:
        raise ValueError(
            f"a result UID needs the source StudyInstanceUID, got {study_instance_uid!r}"
        )
    if not kind:
        raise ValueError(f"a result UID needs a kind of object, got {kind!r}")
    if index < 0:
        raise ValueError(f"a result UID index must be >= 0, got {index!r}")
    identities = sorted([str(m.name), str(m.version)] for m in models)
    return uuid_uid(_DERIVATION, study_instance_uid, kind, index, identities)
