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
