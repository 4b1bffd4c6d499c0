"""The node's log set-up: one format, noisy libraries quieted, expected TF noise dropped."""

from __future__ import annotations

import logging

import pytest

from dicomnode.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = (
        "tensorflow",
        "apscheduler.scheduler",
        "py.warnings",
        "pynetdicom.transport",
        "pynetdicom.acse",
    )
    loggers = [logging.getLogger(n) for n in names]
    filters = [list(logger.filters) for logger in loggers]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, kept in zip(loggers, filters, strict=True):
        logger.filters[:] = kept
    logging.captureWarnings(False)


def test_library_info_is_quiet_tensorflow_warnings_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A TensorFlow warning (re-tracing included: the pipelines trace once per model, see
    test_cxr_pipeline) reaches the log; pynetdicom's INFO chatter does not."""
    configure_logging("INFO")
    tf = logging.getLogger("tensorflow")
    tf.warning("5 out of the last 5 calls to <function f> triggered tf.function retracing.")
    logging.getLogger("pynetdicom").info("association accepted")
    err = capsys.readouterr().err
    assert "WARNING" in err and "triggered tf.function retracing" in err
    assert "association accepted" not in err


def test_debug_keeps_everything(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG")
    logging.getLogger("pynetdicom").debug("pdu bytes")
    logging.getLogger("highdicom").debug("building the content tree")
    err = capsys.readouterr().err
    assert "pdu bytes" in err and "building the content tree" in err


def test_a_skipped_busy_completion_tick_is_not_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    scheduler = logging.getLogger("apscheduler.scheduler")
    scheduler.warning(
        'Execution of job "CompletionScheduler._tick (trigger: interval[0:00:00.500000])" '
        "skipped: maximum number of running instances reached (1)"
    )
    scheduler.error("Job raised an exception")
    err = capsys.readouterr().err
    assert "maximum number of running instances" not in err
    assert "Job raised an exception" in err


def test_a_highdicom_warning_that_quotes_the_patient_name_stays_out_of_the_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """highdicom warns with the PatientName in the message when it has one component."""
    import warnings

    from highdicom.valuerep import check_person_name

    configure_logging("DEBUG")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        check_person_name("Covid0000")
        warnings.warn("an unrelated library warning", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "Covid0000" not in err
    assert "py.warnings" in err and "an unrelated library warning" in err


def test_pydicom_warnings_about_invalid_values_keep_the_value_out_of_the_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A source with a Patient's Birth Date or Sex its VR forbids makes pydicom warn and
    log with the value: the record keeps the VR, not the value."""
    import warnings

    from pydicom import config as pydicom_config
    from pydicom.dataset import Dataset

    configure_logging("INFO")
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
        try:
            ds.PatientBirthDate = "1961-07-23"  # DA is YYYYMMDD
            ds.PatientSex = "Female"  # CS: upper case, and the terms are M, F, O
        finally:
            pydicom_config.settings.writing_validation_mode = None
    err = capsys.readouterr().err
    assert "1961" not in err and "Female" not in err, err
    assert "pydicom: Invalid value for VR DA (the value is not logged)" in err
    assert "py.warnings: Invalid value for VR CS (the value is not logged)" in err


def test_library_chatter_stays_below_warning(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("highdicom.sr.templates").info("adding measurement group")
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("highdicom.sr").warning("a real problem")
    err = capsys.readouterr().err
    assert "adding measurement group" not in err and "Started server process" not in err
    assert "a real problem" in err


def test_a_failed_outgoing_association_is_not_logged_twice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    transport = logging.getLogger("pynetdicom.transport")
    transport.error("Association request failed: unable to connect to remote")
    transport.error("TCP Initialisation Error: [Errno 111] Connection refused")
    logging.getLogger("pynetdicom.acse").error("Association Rejected")
    transport.error("something pynetdicom did not expect")
    err = capsys.readouterr().err
    assert "unable to connect" not in err and "Connection refused" not in err
    assert "Association Rejected" not in err
    assert "something pynetdicom did not expect" in err
    configure_logging("DEBUG")
    transport.error("Association request failed: unable to connect to remote")
    assert "unable to connect" in capsys.readouterr().err
