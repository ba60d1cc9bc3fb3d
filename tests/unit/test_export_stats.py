"""``python -m app export-stats`` (app/export_stats.py): EasyEdit's statistics cache layout, read back the way
EasyEdit's layer_stats / runningstats read it (np.load; ``sample_size`` compared with mom2_n_samples; moment() =
mom2 / count)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from app.cli import main
from app.export_stats import export_easyedit_stats, method_layers, stats_file_name
from editors import stats


def _read_like_easyedit(path, n):
    dat = dict(np.load(path))
    assert dat["sample_size"] == n  # runningstats.load_cached_state: a missing or different value is a cache miss
    assert str(dat["mom2.constructor"]).endswith("SecondMoment()")
    return torch.from_numpy(dat["mom2.mom2"]) / int(dat["mom2.count"]), int(dat["mom2.count"])


def test_export_writes_the_raw_sum_and_count_in_easyedit_layout(tiny_llama, tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "stats")
    manifest = export_easyedit_stats(tiny_llama, [2, 1], out, model_dir_name="llama-tiny", n_tokens=512,
                                     dtype="float64", cache_dir=cache)
    C = stats.layer_covariances(tiny_llama, [1, 2], n_tokens=512, cache_dir=cache, dtype=torch.float64)
    counts = stats.covariance_token_counts(tiny_llama, [1, 2], n_tokens=512, cache_dir=cache)
    for layer in (1, 2):
        module = tiny_llama.spec.mlp_out_module(layer)
        path = os.path.join(out, "llama-tiny", "pydoc_stats", f"{module}_float64_mom2_512.npz")
        assert path.endswith(stats_file_name(module, "float64", 512)) and os.path.isfile(path)
        moment, count = _read_like_easyedit(path, 512)
        assert count == counts[layer] == 512
        torch.testing.assert_close(moment, C[layer], rtol=1e-12, atol=1e-15)
        assert manifest["layers"][str(layer)]["count"] == 512
    with open(os.path.join(out, "llama-tiny", "pydoc_stats", "manifest_float64_512.json")) as fh:
        saved = json.load(fh)
    assert saved["hparams"] == {"stats_dir": os.path.abspath(out), "mom2_dataset": "pydoc", "mom2_n_samples": 512,
                                "mom2_dtype": "float64"}
    assert saved["model_hash"] == tiny_llama.model_hash and saved["corpus"] == stats.corpus_id("builtin")


def test_export_float32_names_and_rounds(tiny_llama, tmp_path):
    out = str(tmp_path / "stats")
    export_easyedit_stats(tiny_llama, [1], out, model_dir_name="m", n=77, n_tokens=256, dataset="wiki",
                          cache_dir=str(tmp_path / "cache"))
    path = os.path.join(out, "m", "wiki_stats", stats_file_name(tiny_llama.spec.mlp_out_module(1), "float32", 77))
    dat = np.load(path)
    assert dat["mom2.mom2"].dtype == np.float32 and int(dat["sample_size"]) == 77
    with pytest.raises(ValueError, match="dtype"):
        export_easyedit_stats(tiny_llama, [1], out, model_dir_name="m", dtype="float16")
    with pytest.raises(ValueError, match="one path component"):
        export_easyedit_stats(tiny_llama, [1], out, model_dir_name="a/b")


def test_method_layers():
    from editors.memit import MEMITConfig
    from editors.mose import MOSEConfig
    from editors.rome import ROMEConfig
    assert method_layers(MEMITConfig()) == [4, 5, 6, 7, 8]
    assert method_layers(ROMEConfig(layer=5)) == [5]
    assert set(method_layers(MOSEConfig(layers=(4,), candidate_layers=(3, 5)))) == {3, 4, 5}


def test_export_stats_cli(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "stats"
    code = main(["export-stats", "--method", "memit", "--model", tiny_dir, "--layers", "1,2", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--model-dir-name", "llama-tiny", "--n", "1000"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "mom2_n_samples: 1000" in text and "mom2_dataset: pydoc" in text and "mom2_dtype: float32" in text
    files = sorted(os.listdir(out / "llama-tiny" / "pydoc_stats"))
    assert files == ["manifest_float32_1000.json", "model.layers.1.mlp.down_proj_float32_mom2_1000.npz",
                     "model.layers.2.mlp.down_proj_float32_mom2_1000.npz"]
    code = main(["export-stats", "--method", "memit", "--model", tiny_dir, "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "layer 4 out of range" in err  # memit's layers 4-8, the tiny model has 4 layers
    code = main(["export-stats", "--method", "memitt", "--out", str(out)])
    assert code == 2 and "Did you mean memit" in capsys.readouterr().err
