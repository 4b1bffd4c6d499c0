"""C-STORE response statuses the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).

The Cxxx "cannot understand" range and the A7xx "out of resources" range leave
the low byte to the implementation; the sub-codes below are ours and are
documented in the README's conformance notes.
"""

from __future__ import annotations

SUCCESS = 0x0000
#: Refused: out of resources. Free disk space is below ``storage.min_free_mb``.
OUT_OF_RESOURCES = 0xA700
#: Error: data set does not match SOP Class (the dataset's SOPClassUID differs from the request).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: cannot understand. The dataset cannot be parsed.
CANNOT_UNDERSTAND = 0xC210
#: Error: cannot understand. Study, Series or SOP Instance UID missing or not a valid UID.
INVALID_UID = 0xC211
#: Error: cannot understand. The dataset's SOPInstanceUID differs from the request's.
SOP_INSTANCE_MISMATCH = 0xC212
#: Failure: processing failure (an internal error, for example the database is unreachable).
PROCESSING_FAILURE = 0x0110
