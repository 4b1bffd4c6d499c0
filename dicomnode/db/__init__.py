"""The index and queue database: models, engine and sessions, migrations."""

from dicomnode.db.database import Database
from dicomnode.db.models import (
    Base,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Series,
    Study,
    StudyState,
    utcnow,
)

__all__ = [
    "Base",
    "Database",
    "Delivery",
    "DeliveryStatus",
    "Instance",
    "Job",
    "JobStatus",
    "Series",
    "Study",
    "StudyState",
    "utcnow",
]
