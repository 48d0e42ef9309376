"""The zoo's committed held-out splits are clean: no test or validation document is a near-copy
(8-word shingle containment >= 0.5) of a calibration document, test and validation share no
near-copies, and a split holds no two copies of one family (benchmarks/zoo/dedupe.py). The
detector itself is checked on planted near-copies, so the first test can fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ZOO_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo"
HELDOUT = ZOO_DIR / "heldout"
sys.path.insert(0, str(ZOO_DIR))

from dedupe import (THRESHOLD, check_clean, clean_heldout, containment, shingles,  # noqa: E402
                    source_family)

DOMAINS = ("prose", "python", "c")
SPLITS = ("test", "validation")


def _read(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _committed() -> tuple[dict[str, list[dict]], list[dict]]:
    if not (HELDOUT / "calibration.jsonl").exists():
        pytest.skip("held-out files not built yet")
    heldout = {split: [d for domain in DOMAINS for d in _read(HELDOUT / f"{domain}.{split}.jsonl")]
               for split in SPLITS}
    return heldout, _read(HELDOUT / "calibration.jsonl")


def _lines(n: int, tag: str) -> str:
    """n distinct lines of code-like text."""
    return "\n".join(f"def {tag}_{i}(value, other={i}):  # {tag} helper number {i} of the module"
                     for i in range(n))


def _doc(text: str, source: str, domain: str = "python") -> dict:
    return {"text": text, "domain": domain, "source": source}


def test_committed_heldout_has_no_near_copies():
    heldout, calibration = _committed()
    assert check_clean(heldout, calibration) == []


def test_committed_heldout_domains_keep_enough_text():
    heldout, _ = _committed()
    for split in SPLITS:
        for domain in DOMAINS:
            chars = sum(len(d["text"]) for d in heldout[split] if d["domain"] == domain)
            assert chars >= 100_000, (split, domain, chars)


def test_shingles_ignore_layout_and_containment_is_one_sided():
    text = _lines(40, "a")
    assert shingles(text) == shingles(text.replace("\n", "\n\n    ").replace(" ", "  "))
    half = "\n".join(text.splitlines()[:20])
    assert containment(shingles(half), shingles(text)) == 1.0
    assert containment(shingles(text), shingles(half)) < 0.6
    assert containment(frozenset(), shingles(text)) == 0.0
    assert shingles("too few words") and len(shingles("too few words")) == 1


def test_source_family_merges_openssl_architectures_only():
    a = "/usr/include/node/openssl/archs/BSD-x86/asm_avx2/include/openssl/x509_vfy.h"
    b = "/usr/include/node/openssl/archs/linux64-s390x/asm/include/openssl/pkcs7.h"
    assert source_family(a) == source_family(b)
    assert source_family("/lib/python3.11/encodings/mac_roman.py") == \
        source_family("/lib/python3.11/encodings/cp500.py")
    assert source_family("/usr/include/elf.h") != source_family("/usr/include/sys/reboot.h")


def test_detector_catches_planted_near_copies_in_committed_files():
    heldout, calibration = _committed()
    # a calibration document with every tenth line rewritten: over half its shingles remain
    original = max(calibration, key=lambda d: len(d["text"]))
    lines = original["text"].splitlines()
    edited = "\n".join(line + " # edited" if i % 10 == 0 else line for i, line in enumerate(lines))
    assert containment(shingles(edited), shingles(original["text"])) >= THRESHOLD
    planted = {split: list(docs) for split, docs in heldout.items()}
    planted["test"].append(_doc(edited, "/planted/copy_of_calibration.txt", original["domain"]))
    problems = check_clean(planted, calibration)
    assert len(problems) == 1 and "/planted/copy_of_calibration.txt" in problems[0]
    assert original["source"] in problems[0]

    # a test document copied into validation
    planted = {split: list(docs) for split, docs in heldout.items()}
    victim = heldout["test"][0]
    planted["validation"].append({**victim, "source": "/planted/copy_of_test.txt"})
    problems = check_clean(planted, calibration)
    assert len(problems) == 1 and "copy_of_test" in problems[0] and victim["source"] in problems[0]


def test_clean_heldout_drops_copies_and_keeps_the_rest():
    calib = _doc(_lines(60, "calib"), "/lib/calib.py")
    clean = _doc(_lines(60, "fresh"), "/lib/fresh.py")
    near_calib = _doc(_lines(60, "calib").replace("helper", "HELPER", 10), "/lib/near_calib.py")
    twin = _doc(_lines(60, "fresh") + "\n# one more line", "/lib/twin.py")  # clean's family
    far_twin = _doc(_lines(60, "fresh"), "/other/dir/twin.py")                     # another family
    licence = _doc(_lines(30, "fresh"), "/lib/licence_heavy.py")                   # half of clean
    val_copy = _doc(_lines(60, "fresh"), "/val/fresh_copy.py")
    val_small = _doc(_lines(20, "val"), "/val/small.py")
    kept, drops = clean_heldout(
        {"test": [clean, near_calib, twin, far_twin, licence], "validation": [val_copy, val_small]},
        [calib])
    assert [d["source"] for d in kept["test"]] == ["/lib/fresh.py", "/other/dir/twin.py"]
    assert [d["source"] for d in kept["validation"]] == ["/val/small.py"]
    reasons = {d.source: (d.reason, d.match) for d in drops}
    assert reasons == {"/lib/near_calib.py": ("calibration", "/lib/calib.py"),
                       "/lib/twin.py": ("same split", "/lib/fresh.py"),
                       "/lib/licence_heavy.py": ("same split", "/lib/fresh.py"),
                       "/val/fresh_copy.py": ("test", "/lib/fresh.py")}
    # the planted inputs really were near-copies, so the committed check would have failed
    assert check_clean({"test": [clean, near_calib], "validation": []}, [calib])


def test_clean_heldout_gives_a_dropped_documents_room_to_the_next():
    calib = _doc(_lines(60, "calib"), "/lib/calib.py")
    copy = _doc(_lines(60, "calib"), "/lib/copy.py")
    a, b = _doc(_lines(60, "a"), "/lib/a.py"), _doc(_lines(60, "b"), "/lib/b.py")
    budget = len(a["text"].encode()) + len(b["text"].encode()) + 200
    kept, _ = clean_heldout({"test": [copy, a, b]}, [calib], max_bytes=budget)
    assert [d["source"] for d in kept["test"]] == ["/lib/a.py", "/lib/b.py"]
    kept, _ = clean_heldout({"test": [a, b]}, [], max_bytes=budget - 1)
    assert [d["source"] for d in kept["test"]] == ["/lib/a.py"]
    kept, _ = clean_heldout({"test": [a]}, [], head_chars=500)
    assert len(kept["test"][0]["text"]) <= 500 and kept["test"][0]["text"].endswith("module")


def test_dedupe_committed_command_on_a_copy(tmp_path, capsys):
    heldout, calibration = _committed()
    import shutil

    for path in HELDOUT.glob("*.jsonl"):
        shutil.copy(path, tmp_path / path.name)
    planted = dict(calibration[0], source="/planted/copy.txt")
    domain = planted["domain"]
    target = tmp_path / f"{domain}.test.jsonl"
    before = _read(target)[::2]  # room to spare, so the planted copy fits wherever it sorts
    target.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                              for d in [planted] + before), encoding="utf-8")
    from build_corpus import dedupe_committed

    assert dedupe_committed(tmp_path, refill=False) == 0
    out = capsys.readouterr().out
    assert "[removed] test" in out and "/planted/copy.txt" in out
    assert _read(target) == before
    for path in HELDOUT.glob("*.jsonl"):
        if path.name != target.name:
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
