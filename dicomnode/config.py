"""Configuration: ``config.toml`` becomes frozen, validated settings.

Every mistake is reported with its key path and the bad value, all of them at
once, so ``dicomnode config check`` can explain a broken file in one go and the
node refuses to start on it.

Relative paths in the file (``node.data_dir``) are relative to the directory of
the configuration file, not to the working directory, so a service manager can
start the node from anywhere.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.toml")

#: AE titles: 1-16 characters of the Default Character Repertoire, no backslash,
#: no control characters, not all spaces (PS3.5 Table 6.2-1, VR AE).
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: Modalities for which a quiet period may be configured; "default" covers the rest.
KNOWN_MODALITIES = ("CR", "DX", "CT", "OT", "default")
LATE_INSTANCE_POLICIES = ("reprocess", "ignore")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


#: How ``[cxr] strategy`` may combine the ensemble members (see
#: :func:`dicomnode.inference.geometry.combine`).
ENSEMBLE_STRATEGIES = ("weighted", "mean", "vote", "stacking")
#: How ``[ct] aggregation`` may turn slice scores into a study score.
CT_AGGREGATIONS = ("max", "top_k_mean", "percentile")


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: who the node is on the network and where it keeps its data."""

    ae_title: str = "DICOMNODE"
    port: int = 11112
    bind: str = "127.0.0.1"
    data_dir: Path = Path("data")
    log_level: str = "INFO"
    log_phi: bool = False


@dataclass(frozen=True)
class DatabaseSettings:
    """``[database]``: the index and queue database (SQLAlchemy URL)."""

    url: str


@dataclass(frozen=True)
class StorageSettings:
    """``[storage]``: instance files under ``<data_dir>/instances``."""

    min_free_mb: int = 1024


@dataclass(frozen=True)
class CallerSettings:
    """One ``[[receive.callers]]`` entry: a peer allowed to open associations."""

    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class TLSSettings:
    """``[receive.tls]``: DICOM over TLS (PS3.15 Annex B). Off unless both files are set."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    """When set, callers must present a certificate signed by one of these CAs."""


@dataclass(frozen=True)
class ReceiveSettings:
    """``[receive]``: the C-STORE SCP."""

    allow_unknown_callers: bool = False
    callers: tuple[CallerSettings, ...] = ()
    accept_other_storage: bool = True
    processes: int = 1
    max_associations: int = 16
    #: Connections from one peer address that have not yet sent their whole
    #: A-ASSOCIATE-RQ; more are closed at once (docs/security.md).
    max_pending_per_peer: int = 8
    max_pdu_size: int = 65536
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    shutdown_grace_s: float = 30.0
    #: Reject an A-ASSOCIATE-RQ whose Called AE Title is not ``node.ae_title``.
    check_called_ae_title: bool = True
    #: Serve associations with the node's fast path (dicomnode/receive/fastpath/);
    #: false: with pynetdicom's stock code (docs/receive.md, docs/security.md).
    fast_path: bool = True
    tls: TLSSettings | None = None


@dataclass(frozen=True)
class CompletionSettings:
    """``[completion]``: when a study counts as complete."""

    quiet_period_s: Mapping[str, float] = field(
        default_factory=lambda: {"CR": 10.0, "DX": 10.0, "CT": 60.0, "OT": 10.0, "default": 30.0}
    )
    force_complete_s: float = 3600.0
    check_interval_s: float = 0.5
    late_instance_policy: str = "reprocess"

    def quiet_period_for(self, modality: str | None) -> float:
        """Return the quiet period in seconds for ``modality`` (``default`` when unknown)."""
        if modality and modality in self.quiet_period_s:
            return self.quiet_period_s[modality]
        return self.quiet_period_s["default"]


@dataclass(frozen=True)
class RoutingSettings:
    """``[routing]``: which instances are frontal chest radiographs."""

    cxr_modalities: tuple[str, ...] = ("CR", "DX")
    chest_body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "CHEST_TO_ABDOMEN")
    frontal_views: tuple[str, ...] = ("PA", "AP")
    lateral_views: tuple[str, ...] = ("LL", "RL", "LLD", "RLD", "LAT", "LATERAL")
    lateral_words: tuple[str, ...] = ("LAT", "LATERAL", "LL", "RL")
    """Words in SeriesDescription or ImageType that mark a view-less image as lateral."""
    chest_words: tuple[str, ...] = ("CHEST", "THORAX", "THX", "LUNG", "LUNGS", "PULMONARY")
    """Study or series description words that say chest (they win over ``non_chest_words``)."""
    non_chest_words: tuple[str, ...] = (
        "TEETH",
        "TOOTH",
        "DENTAL",
        "PANORAMIC",
        "PANO",
        "OPG",
        "ORTHOPANTOMOGRAM",
        "SKULL",
        "SINUS",
        "SINUSES",
        "MANDIBLE",
        "ABDOMEN",
        "PELVIS",
        "KNEE",
        "HIP",
        "HAND",
        "WRIST",
        "FOOT",
        "ANKLE",
        "SPINE",
    )
    """Study or series description words that mark a radiograph with no BodyPartExamined
    as not chest (a dental panoramic CR says "TEETH")."""


@dataclass(frozen=True)
class CXRSettings:
    """``[cxr]``: the chest X-ray pipeline's models and decisions."""

    models_dir: Path = Path("models")
    lung_mask: str = "cxr-lung-unet"
    members: tuple[str, ...] = ("cxr-vgg16", "cxr-vgg19", "cxr-inceptionv3")
    #: What the shipped ensemble's card recommends (chosen on validation data).
    strategy: str = "mean"
    stacking: str = ""
    #: The opacity detector model (its manifest's [postprocess] makes the boxes); empty =
    #: no detector.
    detector: str = "cxr-opacity-detector"
    #: Without a detector: boxes from the thresholded Grad-CAM heat map (else no boxes).
    gradcam_boxes: bool = False
    #: The detector runs only on images the ensemble calls abnormal (besides its own
    #: image-score gate); off: on every analysed image, as its card measured it.
    ensemble_gates_detector: bool = False
    explain_member: str = ""
    explain_class: str = "covid19"
    normal_class: str = "normal"
    abnormal_threshold: float = 0.5
    gradcam_box_threshold: float = 0.5
    batch_size: int = 16
    mixed_precision: bool = False


@dataclass(frozen=True)
class CTSelectionSettings:
    """``[ct.selection]``: which series of a CT study is the axial chest series to analyse."""

    modalities: tuple[str, ...] = ("CT",)
    chest_body_parts: tuple[str, ...] = (
        "CHEST",
        "THORAX",
        "LUNG",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CHEST_TO_ABDOMEN",
        "CHEST_TO_PELVIS",
    )
    chest_words: tuple[str, ...] = ("CHEST", "THORAX", "THX", "LUNG", "LUNGS", "PULMONARY")
    """SeriesDescription words that say chest (they win over ``non_chest_words``)."""
    non_chest_words: tuple[str, ...] = (
        "ABD",
        "ABDOMEN",
        "PEL",
        "PELVIS",
        "HEAD",
        "BRAIN",
        "NECK",
        "SPINE",
        "KNEE",
        "HIP",
        "EXTREMITY",
    )
    """SeriesDescription words that mark a series with no BodyPartExamined as not chest."""
    localizer_words: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
    """ImageType values or SeriesDescription words of localizers."""
    reformat_image_types: tuple[str, ...] = (
        "REFORMATTED",
        "MPR",
        "MIP",
        "MINIP",
        "PROJECTION IMAGE",
        "VOLUME",
        "CURVED",
    )
    """ImageType values of reformats and projections (not the acquired slices)."""
    axial_tolerance_deg: float = 10.0
    min_slices: int = 10
    gap_factor: float = 1.5


@dataclass(frozen=True)
class CTSettings:
    """``[ct]``: the chest CT pipeline's models and decisions."""

    models_dir: Path = Path("models")
    classifier: str = "ct-densenet121"
    lung_mask: str = ""
    """Empty: the classical HU-threshold lung mask; else a lung-mask model's name."""
    lung_threshold_hu: float = -400.0
    aggregation: str = "max"
    top_k: int = 5
    percentile: float = 95.0
    min_lung_fraction: float = 0.02
    evidence_slices: int = 3
    batch_size: int = 16
    mixed_precision: bool = False
    selection: CTSelectionSettings = field(default_factory=CTSelectionSettings)


@dataclass(frozen=True)
class OutputSettings:
    """``[outputs]``: which result objects the node makes and sends."""

    sr: bool = True
    heatmap_sc: bool = True
    draw_boxes: bool = True
    gsps: bool = True
    seg: bool = True
    manufacturer: str = "dicomnode project"
    institution_name: str = ""


@dataclass(frozen=True)
class PriorityRule:
    """One ``[[queue.priority]]`` rule: studies matching every given field get ``priority``."""

    priority: int
    calling_ae_title: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None

    #: Rule fields and the index columns (of instance or series) they compare with.
    FIELDS = ("calling_ae_title", "modality", "body_part_examined", "series_description")


@dataclass(frozen=True)
class QueueSettings:
    """``[queue]``: analysis jobs."""

    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    retry_backoff_max_s: float = 3600.0
    heartbeat_interval_s: float = 5.0
    stalled_after_s: float = 60.0
    poll_interval_s: float = 0.25
    priorities: tuple[PriorityRule, ...] = ()


@dataclass(frozen=True)
class WorkerSettings:
    """``[worker]``: who runs the jobs."""

    processes: int = 1
    threads: int = 1
    pipeline: str = "placeholder"


@dataclass(frozen=True)
class OutboxSettings:
    """``[outbox]``: retries of result deliveries."""

    retry_backoff_s: float = 10.0
    retry_backoff_max_s: float = 600.0
    max_age_s: float = 86400.0


@dataclass(frozen=True)
class ClientTLSSettings:
    """``[destinations.tls]``: send over TLS, verifying the peer against these CAs."""

    ca_certificates: Path
    certificate: Path | None = None
    """With ``private_key``: our client certificate, for peers that require one."""
    private_key: Path | None = None
    server_name: str | None = None
    """Check the peer's certificate is for this name (off when unset: IP-only sites)."""


@dataclass(frozen=True)
class DestinationSettings:
    """One ``[[destinations]]`` entry: a PACS the results are sent to."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True)
class RetentionSettings:
    """``[retention]``: deleting studies the node is finished with (off by default).

    Only studies analysed (done or skipped) whose results were all delivered are ever
    deleted (see :mod:`dicomnode.retention`).
    """

    delete_after_s: float = 0.0
    """Delete such a study once nothing has arrived for it this long; 0 = never by age."""
    high_water_percent: float = 0.0
    """While the data disk is fuller than this, delete such studies oldest first; 0 = off."""
    check_interval_s: float = 300.0

    @property
    def enabled(self) -> bool:
        """Whether ``serve`` runs retention passes."""
        return bool(self.delete_after_s or self.high_water_percent)


@dataclass(frozen=True)
class HTTPSettings:
    """``[http]``: health checks, Prometheus metrics and the status page (off when port = 0)."""

    bind: str = "127.0.0.1"
    port: int = 0

    @property
    def enabled(self) -> bool:
        """Whether ``serve`` starts the HTTP server."""
        return self.port != 0


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration."""

    source: Path | None
    node: NodeSettings
    database: DatabaseSettings
    storage: StorageSettings
    receive: ReceiveSettings
    completion: CompletionSettings
    destinations: tuple[DestinationSettings, ...]
    queue: QueueSettings = field(default_factory=QueueSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    cxr: CXRSettings = field(default_factory=CXRSettings)
    ct: CTSettings = field(default_factory=CTSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    @property
    def instances_dir(self) -> Path:
        """Root directory of the stored instance files."""
        return self.node.data_dir / "instances"

    @property
    def results_dir(self) -> Path:
        """Root directory of the result objects the node produces."""
        return self.node.data_dir / "results"

    @property
    def incoming_dir(self) -> Path:
        """Directory for files still being received (same file system as ``instances_dir``)."""
        return self.node.data_dir / "incoming"


class _Reader:
    """Pulls typed values out of one TOML table, recording problems by key path."""

    def __init__(self, table: Mapping[str, Any], path: str, problems: list[tuple[str, str]]):
        self.table = table
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        if not name:
            return self.path
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append((self.key(name), message))

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept it where a number is wanted.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int):
            ok = True
            value = float(value)
        else:
            ok = isinstance(value, kinds)
        if not ok:
            wanted = " or ".join(_type_name(k) for k in kinds)
            self.problem(name, f"must be {wanted}, got {value!r}")
            return default
        return value

    def number(
        self, name: str, kind: type, default: Any, minimum: float, maximum: float | None = None
    ) -> Any:
        value = self.get(name, kind, default)
        if value is default:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problem(name, f"must be {bound}, got {value!r}")
            return default
        return value

    def ae_title(self, name: str, default: str | None) -> str | None:
        value = self.get(name, str, default)
        if value is default:
            if value is None:
                self.problem(name, "is required (an AE title of 1 to 16 characters)")
            return value
        if not _AE_TITLE_RE.match(value) or not value.strip():
            self.problem(
                name,
                f"must be an AE title of 1 to 16 printable ASCII characters without "
                f"backslash, got {value!r}",
            )
            return default
        return value.strip()

    def host(self, name: str, default: str | None, required: bool) -> str | None:
        value = self.get(name, str, default)
        if value is None:
            if required:
                self.problem(name, "is required (an IP address or host name)")
            return None
        if not value or any(c.isspace() for c in value) or len(value) > 253:
            self.problem(name, f"must be an IP address or host name, got {value!r}")
            return default
        return value

    def check_unknown(self) -> None:
        for name in self.table:
            if name not in self.seen:
                self.problem(name, "is not a known setting (check the spelling)")


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


def _table(parent: _Reader, name: str) -> Mapping[str, Any]:
    value = parent.get(name, dict, {})
    return value if isinstance(value, dict) else {}


def _tables(parent: _Reader, name: str) -> list[tuple[int, Mapping[str, Any]]]:
    value = parent.get(name, list, [])
    out: list[tuple[int, Mapping[str, Any]]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            parent.problems.append(
                (f"{parent.key(name)}[{i}]", f"must be a table ([[{name}]]), got {item!r}")
            )
            continue
        out.append((i, item))
    return out


def _parse_node(root: _Reader, base_dir: Path) -> NodeSettings:
    r = _Reader(_table(root, "node"), "node", root.problems)
    d = NodeSettings()
    bind = r.get("bind", str, d.bind)
    if bind != d.bind:
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            if bind not in ("", "localhost"):
                r.problem("bind", f"must be an IP address to listen on, got {bind!r}")
                bind = d.bind
    data_dir_raw = r.get("data_dir", str, str(d.data_dir))
    if not data_dir_raw:
        r.problem("data_dir", "must not be empty")
        data_dir_raw = str(d.data_dir)
    data_dir = Path(data_dir_raw).expanduser()
    if not data_dir.is_absolute():
        data_dir = base_dir / data_dir
    level = r.get("log_level", str, d.log_level)
    if level.upper() not in LOG_LEVELS:
        r.problem("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        level = d.log_level
    node = NodeSettings(
        ae_title=r.ae_title("ae_title", d.ae_title) or d.ae_title,
        port=r.number("port", int, d.port, 1, 65535),
        bind=bind,
        data_dir=data_dir.resolve(),
        log_level=level.upper(),
        log_phi=r.get("log_phi", bool, d.log_phi),
    )
    r.check_unknown()
    return node


def _parse_database(root: _Reader, data_dir: Path) -> DatabaseSettings:
    r = _Reader(_table(root, "database"), "database", root.problems)
    url = r.get("url", str, "")
    r.check_unknown()
    if not url:
        return DatabaseSettings(url=f"sqlite:///{data_dir / 'dicomnode.db'}")
    scheme = url.split(":", 1)[0]
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
        r.problem(
            "url",
            f"must be a sqlite:/// or postgresql+psycopg:// SQLAlchemy URL, got {url!r}",
        )
    if scheme == "postgresql" or scheme.startswith("postgresql+psycopg2"):
        # We ship psycopg 3; make the plain scheme use it.
        url = "postgresql+psycopg" + url[len(scheme) :]
    return DatabaseSettings(url=url)


def _parse_storage(root: _Reader) -> StorageSettings:
    r = _Reader(_table(root, "storage"), "storage", root.problems)
    d = StorageSettings()
    s = StorageSettings(min_free_mb=r.number("min_free_mb", int, d.min_free_mb, 0))
    r.check_unknown()
    return s


def _existing_file(r: _Reader, name: str, base_dir: Path, required: bool) -> Path | None:
    value = r.get(name, str, None)
    if value is None:
        if required:
            r.problem(name, "is required (a file path)")
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        r.problem(name, f"no such file: {value!r} (resolved to {str(path)!r})")
        return None
    return path


def _parse_tls(parent: _Reader, base_dir: Path) -> TLSSettings | None:
    if "tls" not in parent.table:
        parent.seen.add("tls")
        return None
    r = _Reader(_table(parent, "tls"), "receive.tls", parent.problems)
    certificate = _existing_file(r, "certificate", base_dir, required=True)
    private_key = _existing_file(r, "private_key", base_dir, required=True)
    ca = _existing_file(r, "ca_certificates", base_dir, required=False)
    r.check_unknown()
    if certificate is None or private_key is None:
        return None
    return TLSSettings(certificate=certificate, private_key=private_key, ca_certificates=ca)


def _parse_receive(root: _Reader, base_dir: Path) -> ReceiveSettings:
    r = _Reader(_table(root, "receive"), "receive", root.problems)
    d = ReceiveSettings()
    callers = []
    for i, item in _tables(r, "callers"):
        c = _Reader(item, f"receive.callers[{i}]", root.problems)
        title = c.ae_title("ae_title", None)
        host = c.host("host", None, required=False)
        c.check_unknown()
        if title:
            callers.append(CallerSettings(ae_title=title, host=host))
    s = ReceiveSettings(
        allow_unknown_callers=r.get("allow_unknown_callers", bool, d.allow_unknown_callers),
        callers=tuple(callers),
        accept_other_storage=r.get("accept_other_storage", bool, d.accept_other_storage),
        processes=r.number("processes", int, d.processes, 1, 64),
        max_associations=r.number("max_associations", int, d.max_associations, 1, 1000),
        max_pending_per_peer=r.number(
            "max_pending_per_peer", int, d.max_pending_per_peer, 1, 10000
        ),
        # PS3.8: 0 means unlimited, which we refuse; pynetdicom needs at least 4096.
        max_pdu_size=r.number("max_pdu_size", int, d.max_pdu_size, 4096, 2**31 - 1),
        network_timeout_s=r.number("network_timeout_s", float, d.network_timeout_s, 1),
        acse_timeout_s=r.number("acse_timeout_s", float, d.acse_timeout_s, 1),
        dimse_timeout_s=r.number("dimse_timeout_s", float, d.dimse_timeout_s, 1),
        shutdown_grace_s=r.number("shutdown_grace_s", float, d.shutdown_grace_s, 0),
        check_called_ae_title=r.get("check_called_ae_title", bool, d.check_called_ae_title),
        fast_path=r.get("fast_path", bool, d.fast_path),
        tls=_parse_tls(r, base_dir),
    )
    r.check_unknown()
    if not s.allow_unknown_callers and not s.callers:
        root.problems.append(
            (
                "receive.callers",
                "is empty while receive.allow_unknown_callers is false: no peer could send",
            )
        )
    return s


def _parse_completion(root: _Reader) -> CompletionSettings:
    r = _Reader(_table(root, "completion"), "completion", root.problems)
    d = CompletionSettings()
    quiet = dict(d.quiet_period_s)
    q = _Reader(_table(r, "quiet_period_s"), "completion.quiet_period_s", root.problems)
    for name in list(q.table):
        if name not in KNOWN_MODALITIES and not re.fullmatch(r"[A-Z]{2,16}", name):
            q.problem(name, "must be a DICOM Modality code (e.g. CR, DX, CT) or 'default'")
            q.seen.add(name)
            continue
        quiet[name] = q.number(name, float, quiet.get(name, quiet["default"]), 0)
    policy = r.get("late_instance_policy", str, d.late_instance_policy)
    if policy not in LATE_INSTANCE_POLICIES:
        r.problem(
            "late_instance_policy",
            f"must be one of {', '.join(LATE_INSTANCE_POLICIES)}, got {policy!r}",
        )
        policy = d.late_instance_policy
    s = CompletionSettings(
        quiet_period_s=quiet,
        force_complete_s=r.number("force_complete_s", float, d.force_complete_s, 1),
        check_interval_s=r.number("check_interval_s", float, d.check_interval_s, 0.05, 3600),
        late_instance_policy=policy,
    )
    r.check_unknown()
    if s.force_complete_s < max(quiet.values()):
        root.problems.append(
            (
                "completion.force_complete_s",
                f"must not be shorter than the longest quiet period ({max(quiet.values())} s), "
                f"got {s.force_complete_s!r}",
            )
        )
    return s


def _parse_client_tls(parent: _Reader, base_dir: Path) -> ClientTLSSettings | None:
    if "tls" not in parent.table:
        parent.seen.add("tls")
        return None
    r = _Reader(_table(parent, "tls"), f"{parent.path}.tls", parent.problems)
    ca = _existing_file(r, "ca_certificates", base_dir, required=True)
    certificate = _existing_file(r, "certificate", base_dir, required=False)
    private_key = _existing_file(r, "private_key", base_dir, required=False)
    if (certificate is None) != (private_key is None) and not r.problems:
        r.problem("certificate", "and private_key go together: give both or neither")
    server_name = r.get("server_name", str, None)
    r.check_unknown()
    if ca is None:
        return None
    return ClientTLSSettings(ca, certificate, private_key, server_name)


def _parse_destinations(root: _Reader, base_dir: Path) -> tuple[DestinationSettings, ...]:
    out: list[DestinationSettings] = []
    names: set[str] = set()
    for i, item in _tables(root, "destinations"):
        r = _Reader(item, f"destinations[{i}]", root.problems)
        name = r.get("name", str, None)
        if name is None:
            r.problem("name", "is required (a short name such as 'pacs')")
        elif not _NAME_RE.match(name):
            r.problem("name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
        elif name in names:
            r.problem("name", f"is used by another destination, got {name!r}")
        title = r.ae_title("ae_title", None)
        host = r.host("host", None, required=True)
        port = r.number("port", int, None, 1, 65535)
        if port is None and "port" not in item:
            r.problem("port", "is required (the peer's DICOM port)")
        tls = _parse_client_tls(r, base_dir)
        r.check_unknown()
        if name and title and host and port:
            names.add(name)
            out.append(
                DestinationSettings(name=name, ae_title=title, host=host, port=port, tls=tls)
            )
    return tuple(out)


def _parse_queue(root: _Reader) -> QueueSettings:
    r = _Reader(_table(root, "queue"), "queue", root.problems)
    d = QueueSettings()
    rules = []
    for i, item in _tables(r, "priority"):
        p = _Reader(item, f"queue.priority[{i}]", root.problems)
        priority = p.number("priority", int, None, -1000, 1000)
        if priority is None and "priority" not in item:
            p.problem("priority", "is required (an integer; higher runs first)")
        matches = {name: p.get(name, str, None) for name in PriorityRule.FIELDS}
        if not any(matches.values()):
            p.problem("", f"needs at least one of {', '.join(PriorityRule.FIELDS)}")
        p.check_unknown()
        if priority is not None:
            rules.append(PriorityRule(priority=priority, **matches))
    s = QueueSettings(
        max_attempts=r.number("max_attempts", int, d.max_attempts, 1, 100),
        retry_backoff_s=r.number("retry_backoff_s", float, d.retry_backoff_s, 0),
        retry_backoff_max_s=r.number("retry_backoff_max_s", float, d.retry_backoff_max_s, 0),
        heartbeat_interval_s=r.number(
            "heartbeat_interval_s", float, d.heartbeat_interval_s, 0.1, 3600
        ),
        stalled_after_s=r.number("stalled_after_s", float, d.stalled_after_s, 1),
        poll_interval_s=r.number("poll_interval_s", float, d.poll_interval_s, 0.05, 60),
        priorities=tuple(rules),
    )
    r.check_unknown()
    if s.stalled_after_s < 2 * s.heartbeat_interval_s:
        root.problems.append(
            (
                "queue.stalled_after_s",
                f"must be at least twice queue.heartbeat_interval_s "
                f"({s.heartbeat_interval_s}), got {s.stalled_after_s!r}",
            )
        )
    return s


def _parse_worker(root: _Reader) -> WorkerSettings:
    r = _Reader(_table(root, "worker"), "worker", root.problems)
    d = WorkerSettings()
    pipeline = r.get("pipeline", str, d.pipeline)
    if not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", pipeline):
        r.problem("pipeline", f"must be a pipeline name or module:callable, got {pipeline!r}")
        pipeline = d.pipeline
    s = WorkerSettings(
        processes=r.number("processes", int, d.processes, 0, 64),
        threads=r.number("threads", int, d.threads, 1, 64),
        pipeline=pipeline,
    )
    r.check_unknown()
    return s


def _parse_outbox(root: _Reader) -> OutboxSettings:
    r = _Reader(_table(root, "outbox"), "outbox", root.problems)
    d = OutboxSettings()
    s = OutboxSettings(
        retry_backoff_s=r.number("retry_backoff_s", float, d.retry_backoff_s, 0),
        retry_backoff_max_s=r.number("retry_backoff_max_s", float, d.retry_backoff_max_s, 0),
        max_age_s=r.number("max_age_s", float, d.max_age_s, 1),
    )
    r.check_unknown()
    return s


def _parse_routing(root: _Reader) -> RoutingSettings:
    r = _Reader(_table(root, "routing"), "routing", root.problems)
    d = RoutingSettings()
    values: dict[str, tuple[str, ...]] = {}
    for name in (
        "cxr_modalities",
        "chest_body_parts",
        "frontal_views",
        "lateral_views",
        "lateral_words",
        "chest_words",
        "non_chest_words",
    ):
        default = getattr(d, name)
        raw = r.get(name, list, list(default))
        if not all(isinstance(v, str) and v.strip() for v in raw):
            r.problem(name, f"must be a list of non-empty strings, got {raw!r}")
            raw = list(default)
        values[name] = tuple(v.strip().upper() for v in raw)
    r.check_unknown()
    return RoutingSettings(**values)


def _parse_cxr(root: _Reader, base_dir: Path) -> CXRSettings:
    r = _Reader(_table(root, "cxr"), "cxr", root.problems)
    d = CXRSettings()
    models_dir = Path(r.get("models_dir", str, str(d.models_dir))).expanduser()
    members = r.get("members", list, list(d.members))
    if not members or not all(isinstance(m, str) and _NAME_RE.match(m) for m in members):
        r.problem("members", f"must be a non-empty list of model names, got {members!r}")
        members = list(d.members)
    strategy = r.get("strategy", str, d.strategy)
    if strategy not in ENSEMBLE_STRATEGIES:
        r.problem("strategy", f"must be one of {', '.join(ENSEMBLE_STRATEGIES)}, got {strategy!r}")
        strategy = d.strategy
    s = CXRSettings(
        models_dir=(models_dir if models_dir.is_absolute() else base_dir / models_dir).resolve(),
        lung_mask=r.get("lung_mask", str, d.lung_mask),
        members=tuple(members),
        strategy=strategy,
        stacking=r.get("stacking", str, d.stacking),
        detector=r.get("detector", str, d.detector),
        explain_member=r.get("explain_member", str, d.explain_member),
        explain_class=r.get("explain_class", str, d.explain_class),
        normal_class=r.get("normal_class", str, d.normal_class),
        abnormal_threshold=r.number("abnormal_threshold", float, d.abnormal_threshold, 0, 1),
        gradcam_boxes=r.get("gradcam_boxes", bool, d.gradcam_boxes),
        ensemble_gates_detector=r.get("ensemble_gates_detector", bool, d.ensemble_gates_detector),
        gradcam_box_threshold=r.number(
            "gradcam_box_threshold", float, d.gradcam_box_threshold, 0, 1
        ),
        batch_size=r.number("batch_size", int, d.batch_size, 1, 1024),
        mixed_precision=r.get("mixed_precision", bool, d.mixed_precision),
    )
    r.check_unknown()
    return s


def _words_list(r: _Reader, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of non-empty strings, upper-cased (DICOM code strings and words)."""
    raw = r.get(name, list, list(default))
    if not all(isinstance(v, str) and v.strip() for v in raw):
        r.problem(name, f"must be a list of non-empty strings, got {raw!r}")
        raw = list(default)
    return tuple(v.strip().upper() for v in raw)


def _parse_ct_selection(parent: _Reader) -> CTSelectionSettings:
    r = _Reader(_table(parent, "selection"), "ct.selection", parent.problems)
    d = CTSelectionSettings()
    lists = {
        name: _words_list(r, name, getattr(d, name))
        for name in (
            "modalities",
            "chest_body_parts",
            "chest_words",
            "non_chest_words",
            "localizer_words",
            "reformat_image_types",
        )
    }
    s = CTSelectionSettings(
        **lists,
        axial_tolerance_deg=r.number("axial_tolerance_deg", float, d.axial_tolerance_deg, 0, 45),
        min_slices=r.number("min_slices", int, d.min_slices, 1, 100000),
        gap_factor=r.number("gap_factor", float, d.gap_factor, 1.01, 100),
    )
    r.check_unknown()
    return s


def _parse_ct(root: _Reader, base_dir: Path) -> CTSettings:
    r = _Reader(_table(root, "ct"), "ct", root.problems)
    d = CTSettings()
    models_dir = Path(r.get("models_dir", str, str(d.models_dir))).expanduser()
    names = {}
    for key, default, allow_empty in (
        ("classifier", d.classifier, False),
        ("lung_mask", d.lung_mask, True),
    ):
        value = r.get(key, str, default)
        if not (value == "" and allow_empty) and not _NAME_RE.match(value):
            r.problem(key, f"must be a model folder name{' or empty' * allow_empty}, got {value!r}")
            value = default
        names[key] = value
    aggregation = r.get("aggregation", str, d.aggregation)
    if aggregation not in CT_AGGREGATIONS:
        r.problem(
            "aggregation", f"must be one of {', '.join(CT_AGGREGATIONS)}, got {aggregation!r}"
        )
        aggregation = d.aggregation
    s = CTSettings(
        models_dir=(models_dir if models_dir.is_absolute() else base_dir / models_dir).resolve(),
        classifier=names["classifier"],
        lung_mask=names["lung_mask"],
        lung_threshold_hu=r.number("lung_threshold_hu", float, d.lung_threshold_hu, -1000, 0),
        aggregation=aggregation,
        top_k=r.number("top_k", int, d.top_k, 1, 10000),
        percentile=r.number("percentile", float, d.percentile, 0, 100),
        min_lung_fraction=r.number("min_lung_fraction", float, d.min_lung_fraction, 0, 1),
        evidence_slices=r.number("evidence_slices", int, d.evidence_slices, 1, 100),
        batch_size=r.number("batch_size", int, d.batch_size, 1, 1024),
        mixed_precision=r.get("mixed_precision", bool, d.mixed_precision),
        selection=_parse_ct_selection(r),
    )
    r.check_unknown()
    return s


def _parse_outputs(root: _Reader) -> OutputSettings:
    r = _Reader(_table(root, "outputs"), "outputs", root.problems)
    d = OutputSettings()
    s = OutputSettings(
        sr=r.get("sr", bool, d.sr),
        heatmap_sc=r.get("heatmap_sc", bool, d.heatmap_sc),
        draw_boxes=r.get("draw_boxes", bool, d.draw_boxes),
        gsps=r.get("gsps", bool, d.gsps),
        seg=r.get("seg", bool, d.seg),
        manufacturer=r.get("manufacturer", str, d.manufacturer)[:64],
        institution_name=r.get("institution_name", str, d.institution_name)[:64],
    )
    r.check_unknown()
    return s


def _parse_http(root: _Reader) -> HTTPSettings:
    r = _Reader(_table(root, "http"), "http", root.problems)
    d = HTTPSettings()
    bind = r.get("bind", str, d.bind)
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        if bind != "localhost":
            r.problem("bind", f"must be an IP address to listen on, got {bind!r}")
            bind = d.bind
    s = HTTPSettings(bind=bind, port=r.number("port", int, d.port, 0, 65535))
    r.check_unknown()
    return s


def _parse_retention(root: _Reader) -> RetentionSettings:
    r = _Reader(_table(root, "retention"), "retention", root.problems)
    d = RetentionSettings()
    s = RetentionSettings(
        delete_after_s=r.number("delete_after_s", float, d.delete_after_s, 0),
        high_water_percent=r.number("high_water_percent", float, d.high_water_percent, 0, 99),
        check_interval_s=r.number("check_interval_s", float, d.check_interval_s, 1, 86400),
    )
    r.check_unknown()
    return s


def parse_settings(data: Mapping[str, Any], base_dir: Path, source: Path | None) -> Settings:
    """Validate a parsed TOML document; raise :class:`ConfigError` listing every problem."""
    problems: list[tuple[str, str]] = []
    root = _Reader(data, "", problems)
    node = _parse_node(root, base_dir)
    settings = Settings(
        source=source,
        node=node,
        database=_parse_database(root, node.data_dir),
        storage=_parse_storage(root),
        receive=_parse_receive(root, base_dir),
        completion=_parse_completion(root),
        destinations=_parse_destinations(root, base_dir),
        queue=_parse_queue(root),
        worker=_parse_worker(root),
        outbox=_parse_outbox(root),
        routing=_parse_routing(root),
        cxr=_parse_cxr(root, base_dir),
        ct=_parse_ct(root, base_dir),
        outputs=_parse_outputs(root),
        http=_parse_http(root),
        retention=_parse_retention(root),
    )
    root.check_unknown()
    if settings.http.enabled and settings.http.port == node.port:
        problems.append(("http.port", f"must differ from node.port, got {settings.http.port}"))
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings(path: Path | str = DEFAULT_CONFIG_PATH) -> Settings:
    """Read and validate the configuration file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([(str(path), "file not found")]) from None
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot be read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"is not valid TOML: {exc}")]) from None
    return parse_settings(data, base_dir=path.resolve().parent, source=path.resolve())
