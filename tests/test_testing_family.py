"""fastmerge.testing.make_family: a family is a function of its seeds alone, so writing its models in
parallel processes (``workers``) gives the same files byte for byte."""

from fastmerge.testing import LlamaShape, make_family
from helpers.tolerance import file_digest


def _digests(root):
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_parallel_family_is_the_serial_family(tmp_path):
    shape = LlamaShape(hidden=32, layers=2, intermediate=48, vocab=64, heads=2)
    b1, f1 = make_family(tmp_path / "serial", shape, n_finetunes=2, shard_bytes=9_000, seed=3)
    b2, f2 = make_family(tmp_path / "parallel", shape, n_finetunes=2, shard_bytes=9_000, seed=3, workers=3)
    assert [p.name for p in [b2, *f2]] == ["base", "ft1", "ft2"]
    serial, parallel = _digests(tmp_path / "serial"), _digests(tmp_path / "parallel")
    assert len(serial) > 6 and serial == parallel
    assert _digests(b1) != _digests(f1[0])  # the models differ from each other (the comparison means something)


def test_gathered_writes_are_the_tensor_by_tensor_writes(tmp_path, monkeypatch):
    """Small tensors are written in runs of up to 8 MB (``_Coalesced``): the files are byte for byte those of one
    write per tensor, shard boundaries falling inside runs included (shards of 9 KB, runs of 20 KB)."""
    from fastmerge import testing

    shape = LlamaShape(hidden=32, layers=2, intermediate=48, vocab=64, heads=2)
    fp8 = testing.DeepSeekV3Shape(hidden=128, layers=2, first_k_dense=1, intermediate=128, moe_intermediate=32, experts=4,
                                  heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope=16, qk_rope=8, v_head=16, vocab=128)
    runs = []
    write_run = testing.ShardWriter.write_run
    monkeypatch.setattr(testing.ShardWriter, "write_run", lambda self, names, data: runs.append(len(names)) or write_run(self, names, data))
    monkeypatch.setattr(testing._Coalesced.__init__, "__defaults__", (20_000,))
    make_family(tmp_path / "runs", shape, n_finetunes=1, shard_bytes=9_000, seed=3)
    make_family(tmp_path / "runs-fp8", fp8, n_finetunes=1, shard_bytes=9_000, seed=3, fp8_block=(16, 16))
    assert runs and max(runs) > 1  # the runs were gathered
    monkeypatch.setattr(testing._Coalesced.__init__, "__defaults__", (0,))  # every tensor written alone
    make_family(tmp_path / "one", shape, n_finetunes=1, shard_bytes=9_000, seed=3)
    make_family(tmp_path / "one-fp8", fp8, n_finetunes=1, shard_bytes=9_000, seed=3, fp8_block=(16, 16))
    assert _digests(tmp_path / "runs") == _digests(tmp_path / "one")
    assert _digests(tmp_path / "runs-fp8") == _digests(tmp_path / "one-fp8")
    assert len(_digests(tmp_path / "one")) > 6
