"""The ORU^R01 (built with hl7apy, read back with python-hl7) and its MLLP delivery."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

import hl7  # type: ignore[import-untyped]
import pytest
from hl7apy.parser import parse_message  # type: ignore[import-untyped]

from dicom_node.db import DeliveryState
from dicom_node.findings import Identifiers, StudyFindings
from dicom_node.hl7 import DISCLAIMER, build_oru, send_mllp
from dicom_node.loopback import free_port
from model.card import UNVALIDATED_WARNING
from model.classes import CLASSES, by_key

from helpers.environment import wait_until
from helpers.mllp import MllpReceiver, Mode

CONTROL_ID = "MSG00042"
CLOSED_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
SENT_AT = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)
#: Every HL7 delimiter and non-ASCII text in one DICOM PN (family^given^middle^prefix^suffix,
#: with its ideographic and phonetic groups).
TRICKY_NAME = "Mü|ller&Sohn\\Tilde~^Zoë^Anne^Dr^Jr=山田^太郎=やまだ^たろう"


def identifiers(**changes: Any) -> Identifiers:
    base = Identifiers(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        patient_id="PAT^001|X", issuer_of_patient_id="HOSP&A",
        patient_name=TRICKY_NAME, patient_birth_date="19700102", patient_sex="F",
        accession_number="ACC-7", placer_order_number="PL-1", filler_order_number="FL-1",
        requested_procedure_id="RP-3")
    return dataclasses.replace(base, **changes)


def findings(**changes: Any) -> StudyFindings:
    base = StudyFindings(
        result_id=1, version=1, identifiers=identifiers(), label="covid",
        probabilities={"covid": 0.91234, "normal": 0.05, "pneumonia": 0.0375},
        flags=["covid"], flagged=True, model="cxr-concatenated 1.2.0", model_validated=False,
        problems=["image 2 left out: another patient"],
        closed_at=CLOSED_AT)
    return dataclasses.replace(base, **changes)


def build(study: StudyFindings | None = None, control_id: str = CONTROL_ID) -> bytes:
    return build_oru(study or findings(), control_id, sending_application="DICOMNODE",
                     sending_facility="RAD", receiving_application="RIS",
                     receiving_facility="HOSP", message_time=SENT_AT)


def parse(message: bytes) -> Any:
    return hl7.parse(message.decode("utf-8"))


def segments(message: Any, name: str) -> list[Any]:
    return [s for s in message if str(s(0)) == name]


def field(segment: Any, index: int) -> str:
    """python-hl7 raises for a field after the last one sent: that is an empty one."""
    try:
        return str(segment(index))
    except IndexError:
        return ""


def text(message: Any, value: Any) -> str:
    return str(message.unescape(str(value)))


def obx_by_code(message: Any) -> dict[str, Any]:
    return {str(obx(3)(1)(1)): obx for obx in segments(message, "OBX")}


# -- the message --------------------------------------------------------------------------------

def test_msh_identifies_an_oru_r01_in_utf8() -> None:
    raw = build()
    assert raw.startswith(b"MSH|^~\\&|") and b"\n" not in raw
    assert raw.decode("utf-8").split("\r")[1].startswith("PID|")
    msh = parse(raw).segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01"
    assert str(msh(10)) == CONTROL_ID
    assert str(msh(11)) == "P"
    assert str(msh(12)) == "2.5.1"
    assert str(msh(18)) == "UNICODE UTF-8"
    assert str(msh(7)) == "20240506070810+0000"
    assert [str(msh(n)) for n in (3, 4, 5, 6)] == ["DICOMNODE", "RAD", "RIS", "HOSP"]


def test_message_structure_is_valid_for_hl7apy() -> None:
    assert parse_message(build().decode("utf-8"), find_groups=True).validate()


def test_pid_escaping_round_trips_every_delimiter_and_unicode() -> None:
    raw = build()
    assert "Mü\\F\\ller\\T\\Sohn\\E\\Tilde\\R\\".encode() in raw
    message = parse(raw)
    pid = message.segment("PID")
    assert text(message, pid(3)(1)(1)) == "PAT^001|X"
    assert text(message, pid(3)(1)(4)) == "HOSP&A"
    assert str(pid(3)(1)(5)) == "PI"
    alphabetic, ideographic, phonetic = pid(5)
    family, given, middle, suffix, prefix = (text(message, alphabetic(i)) for i in range(1, 6))
    assert (family, given, middle, suffix, prefix) == ("Mü|ller&Sohn\\Tilde~", "Zoë", "Anne",
                                                       "Jr", "Dr")
    assert [text(message, ideographic(i)) for i in (1, 2)] == ["山田", "太郎"]
    assert [text(message, phonetic(i)) for i in (1, 2)] == ["やまだ", "たろう"]
    assert [str(x(8)) for x in (alphabetic, ideographic, phonetic)] == ["A", "I", "P"]
    assert str(pid(7)) == "19700102"
    assert str(pid(8)) == "F"


def test_plain_name_has_one_xpn_without_representation_code() -> None:
    message = parse(build(findings(identifiers=identifiers(patient_name="Doe^John"))))
    assert str(message.segment("PID")(5)) == "Doe^John"


def test_text_that_looks_escaped_stays_literal() -> None:
    problem = "a \\F\\ b \\E\\ c \\H\\ d\nnext line\x07"
    message = parse(build(findings(problems=[problem])))
    notes = [text(message, nte(3)) for nte in segments(message, "NTE")]
    # python-hl7 turns \.br\ into \r.
    assert notes[-1] == "a \\F\\ b \\E\\ c \\H\\ d\rnext line "


def test_order_numbers_accession_and_final_status() -> None:
    message = parse(build(findings(flagged=False, flags=[], model_validated=True)))
    orc, obr = message.segment("ORC"), message.segment("OBR")
    assert [str(orc(n)) for n in (1, 2, 3)] == ["RE", "PL-1", "FL-1"]
    assert [str(obr(n)) for n in (2, 3)] == ["PL-1", "FL-1"]
    assert str(obr(4)(1)(1)) == "CXR-AI" and str(obr(4)(1)(4)) == "399208008"
    assert str(obr(7)) == "20240506070809+0000"
    assert str(obr(18)) == "ACC-7"
    assert str(obr(19)) == "RP-3"
    assert str(obr(25)) == "F"
    assert str(obr(5)) == ""
    assert {str(obx(11)) for obx in segments(message, "OBX")} == {"F"}


def test_corrected_result_is_status_c() -> None:
    message = parse(build(findings(corrected=True, version=2, model_validated=True)))
    assert str(message.segment("OBR")(25)) == "C"
    assert {str(obx(11)) for obx in segments(message, "OBX")} == {"C"}


def test_an_unvalidated_models_result_is_preliminary_even_when_corrected() -> None:
    for corrected in (False, True):
        message = parse(build(findings(corrected=corrected, model_validated=False)))
        assert str(message.segment("OBR")(25)) == "P"
        assert {str(obx(11)) for obx in segments(message, "OBX")} == {"P"}


def test_flagged_result_is_stat() -> None:
    obr = parse(build()).segment("OBR")
    assert str(obr(5)) == "S"
    assert str(obr(27)(1)(6)) == "S"


def test_one_nm_obx_per_class_with_its_snomed_code() -> None:
    study = findings()
    by_code = obx_by_code(parse(build(study)))
    for cls in CLASSES:
        obx = by_code[cls.snomed_code]
        assert str(obx(2)) == "NM"
        assert str(obx(3)(1)(3)) == "SCT"
        assert str(obx(6)(1)(1)) == "1"
        assert str(obx(8)) == ("A" if cls.key in study.flags else "")
    assert [str(by_code[c.snomed_code](5)) for c in CLASSES] == ["0.912", "0.050", "0.038"]


@pytest.mark.parametrize(("flagged", "flag"), [(True, "A"), (False, "N"), (None, "")])
def test_finding_obx_abnormal_flag(flagged: bool | None, flag: str) -> None:
    finding = obx_by_code(parse(build(findings(flagged=flagged, label="pneumonia"))))["121071"]
    assert str(finding(2)) == "CWE"
    assert str(finding(5)(1)(1)) == by_key("pneumonia").snomed_code
    assert str(finding(5)(1)(3)) == "SCT"
    assert str(finding(8)) == flag


def test_no_label_no_finding_obx() -> None:
    by_code = obx_by_code(parse(build(findings(label=None, probabilities={}, flagged=None,
                                               flags=[]))))
    assert set(by_code) == {"113014", "111001", "111003"}


def test_study_uid_and_model_in_obx() -> None:
    message = parse(build())
    by_code = obx_by_code(message)
    assert str(by_code["113014"](5)) == "1.2.826.0.1.3680043.8.498.1"
    assert str(by_code["111001"](5)) == "cxr-concatenated"
    assert str(by_code["111003"](5)) == "1.2.0"
    assert [str(o(1)) for o in segments(message, "OBX")] == [
        str(n) for n in range(1, len(by_code) + 1)]


def test_unvalidated_model_warning_and_problems_in_nte() -> None:
    message = parse(build())
    notes = [text(message, nte(3)) for nte in segments(message, "NTE")]
    assert notes == [DISCLAIMER, UNVALIDATED_WARNING, "image 2 left out: another patient"]
    validated = parse(build(findings(model_validated=True, problems=[])))
    assert [text(validated, nte(3)) for nte in segments(validated, "NTE")] == [DISCLAIMER]


def test_missing_patient_id_and_accession_leave_fields_empty() -> None:
    ids = identifiers(patient_id=None, issuer_of_patient_id=None, accession_number=None,
                      placer_order_number=None, filler_order_number=None, patient_name=None,
                      patient_birth_date=None, patient_sex=None)
    message = parse(build(findings(identifiers=ids)))
    pid, obr = message.segment("PID"), message.segment("OBR")
    assert field(pid, 3) == field(pid, 5) == field(pid, 7) == field(pid, 8) == ""
    assert field(obr, 18) == field(obr, 2) == field(obr, 3) == ""
    orc = message.segment("ORC")
    assert field(orc, 1) == "RE" and field(orc, 2) == ""
    assert str(message.segment("MSH")(10)) == CONTROL_ID


def test_bad_probability_is_refused() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        build(findings(probabilities={"covid": 1.5}))
    with pytest.raises(ValueError, match="unknown"):
        build(findings(probabilities={"tuberculosis": 0.5}))


# -- MLLP ---------------------------------------------------------------------------------------

def control_ids(rx: MllpReceiver) -> list[str]:
    return [str(m.segment("MSH")(10)) for m in rx.messages]


@pytest.mark.parametrize("mode", [Mode.ACCEPT, Mode.COMMIT_ACCEPT])
def test_accepting_ack_is_done(mode: Mode) -> None:
    with MllpReceiver(mode) as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.DONE, attempt
    assert control_ids(rx) == [CONTROL_ID]
    assert text(rx.messages[0], rx.messages[0].segment("PID")(5)(1)(1)) == "Mü|ller&Sohn\\Tilde~"
    assert rx.errors == []


@pytest.mark.parametrize("mode", [Mode.ERROR, Mode.REJECT])
def test_error_ack_is_retried_with_its_text(mode: Mode) -> None:
    with MllpReceiver(mode, error_text="Unknown patient|id") as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == f"ACK {mode.value}: Unknown patient|id"
    assert control_ids(rx) == [CONTROL_ID]


def test_error_text_from_err_segment_is_truncated() -> None:
    ack = ("MSH|^~\\&|RIS|HOSP|DICOMNODE|RAD|20240506||ACK^R01^ACK|A1|P|2.5.1\n"
           f"MSA|AE|{CONTROL_ID}\n"
           f"ERR||||E||||{'x' * 300}\n")
    with MllpReceiver(Mode.RAW, raw_reply=ack.encode()) as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "ACK AE: " + "x" * 200


def test_ack_for_another_message_is_retried() -> None:
    with MllpReceiver(Mode.OTHER_MESSAGE) as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "ACK for another message"


def test_garbage_reply_is_retried() -> None:
    with MllpReceiver(Mode.GARBAGE) as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "reply is not an HL7 ACK"


def test_hang_is_retried_within_the_timeout() -> None:
    with MllpReceiver(Mode.HANG) as rx:
        started = time.monotonic()
        attempt = send_mllp(rx.host, rx.port, build(), timeout=0.5)
        elapsed = time.monotonic() - started
        # Sent, though the receiver may not have taken it yet on busy cores.
        wait_until(lambda: bool(control_ids(rx)), 10, "the receiver reading the message")
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "no ACK within 0.5 s"
    assert 0.5 <= elapsed < 4.0  # well short of the receiver's own 5 s
    assert control_ids(rx) == [CONTROL_ID]


def test_connection_closed_without_ack_is_retried() -> None:
    with MllpReceiver(Mode.CLOSE) as rx:
        attempt = send_mllp(rx.host, rx.port, build(), timeout=5)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "connection closed without an ACK"


def test_refused_connection_is_retried() -> None:
    attempt = send_mllp("127.0.0.1", free_port(), build(), timeout=2)
    assert attempt.state is DeliveryState.PENDING
    assert attempt.detail == "cannot connect: ConnectionRefusedError"


def test_not_a_message_never_raises() -> None:
    with MllpReceiver(Mode.ACCEPT) as rx:
        attempt = send_mllp(rx.host, rx.port, b"\xff\xfe not HL7", timeout=2)
    assert attempt.state is DeliveryState.PENDING
