"""The standalone files (model, vae, text, diffusion, corrupt, cep, fid) work copied alone into an empty folder."""
import os
import shutil
import sys

import pytest
from conftest import ROOT, run


@pytest.mark.slow
@pytest.mark.parametrize("name, use", [
    ("model", "model.build_model('DiT-Ti/8', 16, num_classes=3)(torch.zeros(1, 4, 16, 16), torch.zeros(1), "
              "torch.zeros(1, dtype=torch.long))"),
    ("vae", "vae.AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8).decode(torch.zeros(1, 4, 2, 2))"),
    ("text", "text.TextEmbedder(text.TextEncoder(64, 1), 0.1)(text.tokenize(['a red circle']))"),
    ("diffusion", "diffusion.GaussianDiffusion().respaced(4).sample(lambda x, t: torch.zeros(1, 6, 4, 4), "
                  "torch.randn(1, 3, 4, 4))"),
    ("corrupt", "corrupt.corrupt_conditions([0, 1, 2, 3] * 5, 0.1, seed=0)"),
    ("cep", "cep.CEP()(torch.zeros(2, 8))"),
    ("fid", "fid.frechet_distance(np.zeros(4), np.eye(4), np.ones(4), np.eye(4))")])
def test_a_standalone_file_works_copied_alone_into_an_empty_folder(tmp_path, name, use):
    shutil.copy(os.path.join(ROOT, name + ".py"), tmp_path)
    code = f"import sys\nassert {ROOT!r} not in sys.path\nimport numpy as np, torch, {name}\n{use}"
    run([sys.executable, "-c", code], cwd=tmp_path)
    assert sorted(os.listdir(tmp_path)) in ([f"{name}.py"], ["__pycache__", f"{name}.py"])
