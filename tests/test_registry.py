import json
import sqlite3

import pytest

from memupdate.serving.registry import Registry, RegistryError, validate_name


def fake_adapter(folder, rank=4, payload=b"weights"):
    """A folder shaped like a peft adapter (the registry only copies and hashes it)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def test_publish_numbers_versions_and_copies_immutably(tmp_path):
    reg = Registry(tmp_path / "reg")
    v1 = reg.publish("kb", fake_adapter(tmp_path / "a1"), {"facts": 3})
    v2 = reg.publish("kb", fake_adapter(tmp_path / "a2", rank=8, payload=b"other"), {"facts": 5})
    assert (v1.version, v2.version) == (1, 2) and v2.rank == 8
    assert v1.path == tmp_path / "reg" / "kb" / "v1" and v1.path.is_dir()
    assert json.loads((v2.path / "metadata.json").read_text())["sha256"] == v2.sha256
    assert v1.sha256 != v2.sha256
    assert reg.live("kb") is None and reg.knowledge_bases() == ["kb"]
    # The registry's copy is independent of the source folder.
    (tmp_path / "a1" / "adapter_model.safetensors").write_bytes(b"changed")
    assert reg.version("kb", 1).sha256 == v1.sha256


def test_live_rollback_and_delete(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.publish("kb", fake_adapter(tmp_path / f"a{i}", payload=bytes([i])), {})
    with pytest.raises(RegistryError, match="no live version"):
        reg.rollback("kb")
    reg.record_serving("kb", 1, {"fact_recall": 1.0})
    reg.set_live("kb", 1)
    reg.record_serving("kb", 3, {"fact_recall": 1.0})
    reg.set_live("kb", 3)
    assert reg.live("kb").version == 3
    # Version 2 was never verified through serving: rollback skips it.
    assert reg.rollback("kb").version == 1 and reg.live("kb").version == 1
    with pytest.raises(RegistryError, match="no earlier verified version"):
        reg.rollback("kb")
    with pytest.raises(RegistryError, match="has no version 9"):
        reg.set_live("kb", 9)
    reg.delete("kb")
    assert reg.knowledge_bases() == [] and not (tmp_path / "reg" / "kb").exists()
    with pytest.raises(RegistryError, match="unknown knowledge base"):
        reg.delete("kb")


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a/b", "", "A", "a\x00b", "x" * 64, ".hidden", "a b", 5]
)
def test_names_that_could_escape_or_confuse_are_refused(tmp_path, name):
    with pytest.raises(RegistryError, match="invalid knowledge base name"):
        validate_name(name)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError):
        reg.publish(name, fake_adapter(tmp_path / "a"), {})
    created = {p.name for p in (tmp_path / "reg").iterdir()}
    assert created <= {"registry.db", "registry.db-wal", "registry.db-shm"}


def test_not_an_adapter_folder_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="not a peft adapter folder"):
        reg.publish("kb", tmp_path / "empty", {})
    assert reg.knowledge_bases() == []


def test_crash_mid_publish_leaves_nothing_listed_and_sweep_cleans_it(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish("kb", fake_adapter(tmp_path / "a"), {})
    # What a crash between copy and commit leaves: a folder with no row.
    fake_adapter(tmp_path / "reg" / "kb" / ".incoming-x")
    fake_adapter(tmp_path / "reg" / "kb" / "v2")
    assert [v.version for v in reg.versions("kb")] == [1]
    removed = reg.sweep()
    assert {p.name for p in removed} == {".incoming-x", "v2"}
    # The next publish takes number 2 cleanly.
    assert reg.publish("kb", fake_adapter(tmp_path / "b"), {}).version == 2


def test_database_is_in_wal_mode(tmp_path):
    Registry(tmp_path / "reg")
    db = sqlite3.connect(tmp_path / "reg" / "registry.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
