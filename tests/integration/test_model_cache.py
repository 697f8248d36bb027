"""The model cache on a fresh machine: processes started at once share one build and all load it."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_two_processes_on_a_fresh_cache_both_get_a_complete_model(tmp_path):
    from pipeline import models

    env = {**os.environ, "RLHF_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from pipeline.models import resolve, load_causal_lm; p = resolve('tiny'); load_causal_lm(p); print(p)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(tmp_path / "models" / models.TINY_VERSION)}
    assert models.missing_parts(tmp_path / "models" / models.TINY_VERSION) == []
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == [
        models.TINY_VERSION]
