"""Tests for trainer/lr_override.py: encodings, malformed files, and the pending/applied renames."""

import pytest
import testutil

from trainer import lr_override
from trainer.lr_override import Rejected, Request

PATH = "WORKDIR/lr_override.json"
WANTED = ('{"set": LR}', '{"multiply": FACTOR}')  # The fix every rejection message shows.


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------
# parse: accepted files


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("utf-8", b""),
        ("utf-8-sig", b"\xef\xbb\xbf"),
        ("utf-16", b"\xff\xfe"),  # Python's 'utf-16' writes LE with a BOM, as PowerShell 5 does.
        ("utf-16-le", b"\xff\xfe"),  # The BOM added by hand below.
        ("utf-16-be", b"\xfe\xff"),
        ("utf-32", b"\xff\xfe\x00\x00"),
        ("utf-32-be", b"\x00\x00\xfe\xff"),
    ],
)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"set": 0.01}', Request("set", 0.01)),
        ('{"multiply": 0.5}\n', Request("multiply", 0.5)),
        ('{"multiply": 3}\r\n', Request("multiply", 3.0)),  # PowerShell line end; an int.
        ('  \n\t{ "set" : 1e-3 }  \n\n', Request("set", 0.001)),
    ],
)
def test_parse_accepts_encodings_and_whitespace(encoding, bom, text, expected):
    raw = text.encode(encoding)
    if not raw.startswith(bom):
        raw = bom + raw
    assert raw.startswith(bom)
    request = lr_override.parse(raw, PATH)
    assert request == expected
    assert type(request.value) is float


def test_request_prints_as_the_file_would_read():
    assert str(Request("multiply", 0.5)) == '{"multiply": 0.5}'


@pytest.mark.parametrize(
    ("action", "value"), [("divide", 2.0), ("set", 0.0), ("set", -1.0), ("set", float("nan"))]
)
def test_request_checks_itself(action, value):
    with pytest.raises(ValueError):
        Request(action, value)


# ---------------------------------------------------------------------------------------------
# parse: rejected files


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe\xff", "save it as UTF-8"),  # A UTF-16 BOM, then half a character.
        (b"\xff\xff\xff", "save it as UTF-8"),
        ('{"set": 0.01} # für'.encode("latin-1"), "save it as UTF-8"),  # Not UTF-8.
        ('{"set": 0.01}'.encode("utf-16-le"), "UTF-16 without a byte-order mark"),
        (b"", "empty"),
        (b" \n", "empty"),
        (b"null", "one key"),
        (b"[]", "one key"),
        (b'["set", 0.1]', "one key"),
        (b"{}", "one key"),
        (b"0.01", "one key"),
        (b"not json", "not JSON"),
        (b'{"set": 0.01', "not JSON"),
        (b"{'set': 0.01}", "not JSON"),  # Python, not JSON, quotes.
        (b'{"set": "abc"}', '"abc" is not a number'),
        (b'{"set": "0.01"}', "is not a number"),
        (b'{"set": true}', "true is not a number"),
        (b'{"set": null}', "null is not a number"),
        (b'{"multiply": [0.5]}', "is not a number"),
        (b'{"set": -1}', "not > 0"),
        (b'{"multiply": 0}', "not > 0"),
        (b'{"set": NaN}', "not a finite number"),
        (b'{"set": Infinity}', "not a finite number"),
        (b'{"set": -Infinity}', "not a finite number"),
        (b'{"set": 1e400}', "not a finite number"),  # json reads it as inf.
        (b'{"set": 1' + b"0" * 400 + b"}", "too large"),  # An int beyond float range.
        (b'{"set": 0.1, "multiply": 2}', "one key"),
        (b'{"set": 0.1, "set": 0.2}', "duplicate keys"),
        (b'{"divide": 2}', "unknown action 'divide'"),
        (b'{"Set": 0.1}', "unknown action 'Set'"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid"),  # Nesting too deep for json.
    ],
)
def test_parse_rejects_with_path_problem_and_fix(raw, problem):
    with pytest.raises(Rejected) as caught:
        lr_override.parse(raw, PATH)
    message = str(caught.value)
    assert message.startswith(PATH + " must hold ")
    assert all(form in message for form in WANTED)
    assert problem in message
    assert "\n" not in message
    assert len(message) < 500  # The received text is cut short.


def test_rejection_shows_the_received_text_with_repr():
    with pytest.raises(Rejected, match=r"got '\{\"set\": -1\}\\n' "):
        lr_override.parse(b'{"set": -1}\n', PATH)
    with pytest.raises(Rejected, match=r"got b'\\xff\\xfe\\xff' "):
        lr_override.parse(b"\xff\xfe\xff", PATH)
    with pytest.raises(Rejected, match=r"got '\{\"set\": 1xxxx+'\.\.\. \(1010 characters in all\)"):
        lr_override.parse(b'{"set": 1' + b"x" * 1000 + b"}", PATH)


# ---------------------------------------------------------------------------------------------
# take_pending, mark_applied, mark_rejected


def test_no_file_is_none(tmp_path):
    assert lr_override.take_pending(str(tmp_path), 5) is None
    assert lr_override.mark_applied(str(tmp_path), 5) is None
    assert lr_override.mark_rejected(str(tmp_path), 5) is None
    assert _files(tmp_path) == []


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_good_file_stays_pending_until_marked_applied(tmp_path, encoding):
    path = tmp_path / lr_override.OVERRIDE_FILE
    raw = '{"multiply": 0.5}\r\n'.encode(encoding)
    path.write_bytes(raw)
    # Pending: read again each time until marked (a crash before the checkpoint re-applies it).
    for step in (10, 20):
        assert lr_override.take_pending(str(tmp_path), step) == Request("multiply", 0.5)
        assert _files(tmp_path) == [lr_override.OVERRIDE_FILE]
    applied = lr_override.mark_applied(str(tmp_path), 20)
    assert applied == f"{tmp_path}/lr_override.applied-20.json"
    assert _files(tmp_path) == ["lr_override.applied-20.json"]
    assert (tmp_path / "lr_override.applied-20.json").read_bytes() == raw  # The record, as is.
    assert lr_override.take_pending(str(tmp_path), 30) is None


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe\xff", b'{"set": "abc"}', b'{"divide": 2}', b"", "{'set': 1}".encode("cp1252")],
)
def test_bad_file_is_renamed_rejected_and_acts_once(tmp_path, raw):
    path = tmp_path / lr_override.OVERRIDE_FILE
    path.write_bytes(raw)
    kept_as = f"{tmp_path}/lr_override.rejected-7.json"
    with pytest.raises(Rejected) as caught:
        lr_override.take_pending(str(tmp_path), 7)
    message = str(caught.value)
    assert message.startswith(f"{path} must hold ")
    assert message.endswith(f"; ignored it (kept as {kept_as}), write a new one")
    assert caught.value.kept_as == kept_as
    assert _files(tmp_path) == ["lr_override.rejected-7.json"]
    assert (tmp_path / "lr_override.rejected-7.json").read_bytes() == raw
    assert lr_override.take_pending(str(tmp_path), 8) is None  # Reported once, not every loop.


def test_mark_rejected_for_a_request_that_cannot_be_applied(tmp_path):
    (tmp_path / lr_override.OVERRIDE_FILE).write_text('{"set": 0.1}')
    assert lr_override.take_pending(str(tmp_path), 99) == Request("set", 0.1)
    assert (
        lr_override.mark_rejected(str(tmp_path), 99) == f"{tmp_path}/lr_override.rejected-99.json"
    )
    assert _files(tmp_path) == ["lr_override.rejected-99.json"]


def test_a_new_file_after_a_record_of_the_same_step_replaces_the_record(tmp_path):
    # A rerun after a crash reaches the same step again: the newest record wins, nothing fails.
    for text in ('{"set": 0.1}', '{"set": 0.2}'):
        (tmp_path / lr_override.OVERRIDE_FILE).write_text(text)
        assert lr_override.take_pending(str(tmp_path), 3) is not None
        lr_override.mark_applied(str(tmp_path), 3)
    assert (tmp_path / "lr_override.applied-3.json").read_text() == '{"set": 0.2}'


@pytest.mark.parametrize("request_", [None, Request("set", 0.1), Request("multiply", 1 / 3)])
def test_broadcast_from_chief_carries_the_request_exactly(request_):
    """Over 2 replicas, as a multi-worker run's collective does: the value arrives bit for bit
    (float64), and once (only replica 0 contributes; a sum of every replica's would double it)."""
    strategy = testutil.mirrored(2)
    assert lr_override.broadcast_from_chief(strategy, request_) == request_
