"""`python -m train caption`: a tiny random LLaVA (built here from configs, nothing downloaded)
captions folder, metadata.jsonl and webdataset sources; bad images listed; a SIGKILLed run
resumed to the same output; nothing done twice; wrong inputs refused before any image is read;
the captions read by `prepare`."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from caption import random_llava  # bench/caption.py (bench/ is on the path: tests/conftest.py)
from engine.data import captioning, demo, open_cache, sources
from engine.data.vlm import Captioner, Sampling, inspect_vlm
from tests.data.conftest import jpeg_bytes
from tests.train.conftest import run_cli
from train.__main__ import main as train_main

GOOD = 7            # demo images
BAD = {"trunc.jpg": "undecodable image", "empty.png": "empty file"}
FAST = ["--max-new-tokens", "12", "--batch", "2", "--workers", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    model = random_llava(path, "tiny")
    model.generation_config.min_new_tokens = 4  # a random model may stop at once: keep captions non-empty
    model.generation_config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder_source(tmp_path_factory):
    """7 demo images with their own captions, a truncated JPEG and an empty PNG (both bad), and an
    image without a caption (good: it gets one)."""
    root = tmp_path_factory.mktemp("src")
    demo.generate(root, GOOD - 1, 32, seed=3)
    image = Image.open(root / "000000.png").convert("RGB")
    data = jpeg_bytes(image)
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "uncaptioned.png")
    return root


def _caption(src, out, vlm, *extra) -> int:
    torch.set_num_threads(1)  # the same arithmetic as the CLI subprocesses (OMP_NUM_THREADS=1)
    return train_main(["caption", "--images", str(src), "--vlm", str(vlm), "--out", str(out), *FAST, *extra])


def _outputs(out) -> dict[str, str]:
    """Every output file under OUT (state folder aside) -> its content, or "-> target" for a link."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if relative.startswith(captioning.STATE_DIR):
            continue
        if path.is_symlink():
            files[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            files[relative] = path.read_bytes().decode("utf-8", errors="replace")
    return files


def _journal_records(out) -> list[dict]:
    lines = []
    for path in sorted((out / captioning.STATE_DIR).glob("journal-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


@pytest.fixture(scope="module")
def reference(folder_source, vlm, tmp_path_factory):
    """One uninterrupted run over the folder source."""
    out = tmp_path_factory.mktemp("reference") / "captions"
    assert _caption(folder_source, out, vlm) == 0
    return out


def test_every_good_image_captioned_and_bad_ones_listed(reference, folder_source):
    keys = [item.key for item in sources.open_source(folder_source).items]
    good = [key for key in keys if key not in BAD]
    assert len(good) == GOOD
    for key in good:
        image = reference / key
        assert image.is_symlink() and image.resolve() == (folder_source / key).resolve()
        assert image.with_suffix(".txt").read_text().strip(), key
    for key in BAD:
        assert not (reference / key).exists()
    skipped = [json.loads(line) for line in (reference / "skipped.jsonl").read_text().splitlines()]
    assert [r["source"] for r in skipped] == [k for k in keys if k in BAD]  # source order, as prepare lists
    for record in skipped:
        assert record["reason"].startswith(BAD[record["source"]]), record
    records = _journal_records(reference)
    assert sorted(r["source"] for r in records) == sorted(keys)  # each item once
    report = json.loads((reference / "density.json").read_text())
    assert report["captioned"]["captions"] == GOOD
    assert report["original"]["captions"] == GOOD - 1  # the uncaptioned image has no original
    assert "textblob" in report["tagger"] and report["valid_above"] == 10


def test_killed_run_resumes_to_the_same_output(reference, folder_source, vlm, tmp_path, monkeypatch):
    out = tmp_path / "captions"
    args = ["caption", "--images", folder_source, "--vlm", vlm, "--out", out, *FAST]
    killed = run_cli(*args, check=False, ENGINE_DEBUG_KILL="caption-batch:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    records = _journal_records(out)
    assert not (out / "skipped.jsonl").exists()  # killed before the merge
    assert 4 <= len(records) < GOOD + len(BAD)  # two batches of two images, and any bad ones met on the way

    resumed = run_cli(*args)
    assert f"{len(records)} already done" in resumed.stderr
    assert _outputs(out) == _outputs(reference)
    after = _journal_records(out)
    assert after[:len(records)] == records  # nothing lost, the first run's lines kept
    assert sorted(r["source"] for r in after) == sorted(r["source"] for r in _journal_records(reference))  # none twice

    # nothing missing: no work, no model loaded, no file rewritten
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing is missing")
    monkeypatch.setattr(captioning, "Captioner", no_model)
    stamps = {p: p.lstat().st_mtime_ns for p in out.rglob("*")}
    assert _caption(folder_source, out, vlm) == 0
    assert {p: p.lstat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_captions_flow_through_prepare(reference, tiny_text_encoder, tmp_path):
    cache_dir = tmp_path / "cache"
    assert train_main(["prepare", "--images", str(reference), "--out", str(cache_dir), "--vae", "pixels",
                       "--text-encoder", tiny_text_encoder, "--resolution", "32", "--device", "cpu",
                       "--workers", "1", "--no-progress"]) == 0
    cache = open_cache(cache_dir, verify="open")
    assert cache.num_samples == GOOD and cache.meta["num_skipped"] == 0
    for i in range(cache.num_samples):
        assert cache.caption(i) == (reference / cache.source(i)).with_suffix(".txt").read_text().strip()


def _metadata_source(root, folder_source):
    root.mkdir()
    lines = []
    for name in ("000000.png", "000001.png", "000002.png", "uncaptioned.png", "empty.png"):
        shutil.copy(folder_source / name, root / name)
        caption = folder_source / name.replace(".png", ".txt")
        record = {"file_name": name}
        if caption.exists():
            record["text"] = caption.read_text()
        lines.append(json.dumps(record) + "\n")
    lines.append(json.dumps({"file_name": "gone.png", "text": "a file listed but absent"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))
    return root


def test_metadata_source_to_metadata_jsonl(folder_source, vlm, tiny_text_encoder, tmp_path):
    src = _metadata_source(tmp_path / "meta", folder_source)
    out = tmp_path / "captions"
    assert _caption(src, out, vlm) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["000000.png", "000001.png", "000002.png", "uncaptioned.png"]
    assert all(r["text"] for r in records)
    skipped = {r["source"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"empty.png": "empty file", "gone.png": "missing file"}
    cache_dir = tmp_path / "cache"
    assert train_main(["prepare", "--images", str(out), "--out", str(cache_dir), "--vae", "pixels",
                       "--text-encoder", tiny_text_encoder, "--resolution", "32", "--device", "cpu",
                       "--workers", "1", "--no-progress"]) == 0
    cache = open_cache(cache_dir)
    assert sorted(cache.caption(i) for i in range(cache.num_samples)) == sorted(r["text"] for r in records)


def test_webdataset_source_to_tars(folder_source, vlm, tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    for part, names in enumerate([("000000", "000001"), ("000002", "000003")]):
        with tarfile.open(src / f"part{part}.tar", "w") as tar:
            for name in names:
                tar.add(folder_source / f"{name}.png", f"{name}.png")
                tar.add(folder_source / f"{name}.txt", f"{name}.txt")
    out = tmp_path / "captions"
    assert _caption(src, out, vlm) == 0
    for part in (0, 1):
        with tarfile.open(out / f"part{part}.tar") as tar:
            names = tar.getnames()
            assert len(names) == 4 and names[0].endswith(".png") and names[1].endswith(".txt")
            image = tar.extractfile(names[0]).read()
            assert image == (folder_source / names[0]).read_bytes()  # copied byte for byte
    captioned = sources.open_source(out)
    assert captioned.kind == "webdataset" and len(captioned.items) == 4
    new = {r["source"]: r["caption"] for r in _journal_records(out)}
    assert {item.key: item.read_caption() for item in captioned.items} == new


def test_two_ranks_split_the_work(folder_source, vlm, tmp_path):
    out = tmp_path / "captions"
    assert _caption(folder_source, out, vlm, "--rank", "0", "--world", "2", "--shard-size", "3") == 0
    assert not (out / "skipped.jsonl").exists()  # rank 1 has not run: no merge
    assert _caption(folder_source, out, vlm, "--rank", "1", "--world", "2", "--shard-size", "3") == 0
    keys = [item.key for item in sources.open_source(folder_source).items]
    by_rank = {}
    for rank in (0, 1):
        path = captioning.journal_path(out, rank, 2)
        by_rank[rank] = [json.loads(line)["source"] for line in path.read_text().splitlines()]
    assert sorted(by_rank[0]) == sorted(keys[0:3] + keys[6:9])  # chunks 0 and 2
    assert sorted(by_rank[1]) == sorted(keys[3:6])              # chunk 1
    assert (out / captioning.STATE_DIR / captioning.COMPLETE_FILE).is_file()
    assert len(list(out.glob("*.txt"))) == GOOD


def test_sampling_is_reproducible_from_the_seed(vlm, folder_source):
    images = [Image.open(folder_source / f"00000{i}.png").convert("RGB") for i in range(3)]
    def run(seed):
        captioner = Captioner(inspect_vlm(vlm), device="cpu", dtype=torch.float32, max_new_tokens=10,
                              sampling=Sampling(True, temperature=1.0, top_p=0.9, seed=seed))
        return captioner.generate(captioner.inputs(images), "first-key")
    first = run(5)
    assert run(5) == first
    assert run(6) != first


def _no_image_reads(monkeypatch):
    def refuse(self):
        raise AssertionError(f"an image or caption was read: {self.path}")
    monkeypatch.setattr(sources.Blob, "read", refuse)


def test_not_an_image_text_to_text_model(folder_source, tiny_text_encoder, tmp_path, monkeypatch, capsys):
    _no_image_reads(monkeypatch)
    out = tmp_path / "captions"
    assert _caption(folder_source, out, tiny_text_encoder) == 2
    error = capsys.readouterr().err
    assert tiny_text_encoder in error and "not an image-text-to-text model" in error and "'t5'" in error
    assert not out.exists()
    assert _caption(folder_source, out, tmp_path / "org" / "some-model") == 2  # a hub id is no local folder
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_processor_missing(folder_source, vlm, tmp_path, monkeypatch, capsys):
    _no_image_reads(monkeypatch)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(vlm / name, bare / name)
    out = tmp_path / "captions"
    assert _caption(folder_source, out, bare) == 2
    error = capsys.readouterr().err
    assert str(bare) in error and "processor" in error
    assert not out.exists()


def test_output_folder_of_another_corpus(folder_source, vlm, reference, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    demo.generate(other, 3, 32, seed=9)
    before = _outputs(reference)
    _no_image_reads(monkeypatch)
    assert _caption(other, reference, vlm) == 2
    error = capsys.readouterr().err
    assert str(reference) in error and "another corpus" in error
    assert _outputs(reference) == before

    assert _caption(folder_source, reference, vlm, "--prompt", "Describe this image") == 2
    assert "other settings: prompt" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.txt").write_text("someone else's caption")
    assert _caption(folder_source, foreign, vlm) == 2
    assert str(foreign) in capsys.readouterr().err

    assert _caption(folder_source, folder_source / "captions", vlm) == 2  # inside the source
    assert "overlaps the image source" in capsys.readouterr().err


def test_journal_torn_last_line(tmp_path):
    """A crash mid-append leaves a partial last line: readers skip it, its writer cuts it off."""
    (tmp_path / captioning.STATE_DIR).mkdir()
    path = captioning.journal_path(tmp_path, 0, 1)
    path.write_bytes(b'{"source": "a.png", "caption": "a cat"}\n{"source": "b.png", "capt')
    assert list(captioning.read_journals(tmp_path)) == ["a.png"]
    journal = captioning.Journal(path)
    journal.append([{"source": "b.png", "reason": "empty file"}])
    journal.close()
    assert captioning.read_journals(tmp_path) == {"a.png": {"source": "a.png", "caption": "a cat"},
                                                  "b.png": {"source": "b.png", "reason": "empty file"}}
    path.write_bytes(b'{"source": "a.png"\n{"source": "b.png", "reason": "x"}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        captioning.read_journals(tmp_path)
