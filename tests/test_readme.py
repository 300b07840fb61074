"""Every ```python block of README.md runs as written (each in a fresh namespace, in an empty folder).

Marker convention: an HTML comment on the line before a block names what it needs,
`<!-- readme-test: official-weights -->` or `<!-- readme-test: cuda -->` (comma-separated for several):

- official-weights: small stand-ins for the released files, under the names the README uses
  (`mage-vitb-1600.pth`, `mage-vitl-1600.pth`, `vqgan_jax_strongaug.ckpt`), are written into the folder
  first: random weights in the official layout (official vocabulary, legacy parameters, `'model'` /
  `'state_dict'` wrappers) at CPU sizes, so the block's loading code runs unchanged.
- cuda: the block runs only where a CUDA GPU is present.

Blocks added later are covered automatically; a new marker needs a fixture here.
"""

import dataclasses
import os
import re

import pytest
import torch

import mage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    needs: tuple[str, ...]


def python_blocks(path: str) -> list[Block]:
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            m = MARKER.search(prev)
            needs = tuple(n.strip() for n in m.group(1).split(",")) if m else ()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append(Block(i + 1, "\n".join(lines[i + 1 : end]) + "\n", needs))
            i = end
        i += 1
    return blocks


def _official_stand_ins(folder: str) -> None:
    """Tiny models in the released files' layout (docs/REFERENCE.md 3.5, 4.11)."""
    tok = mage.TokenizerConfig(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, embed_dim=16, n_embed=1024)
    config = mage.MAGEConfig(embed_dim=192, depth=1, num_heads=3, decoder_embed_dim=192, decoder_depth=1,
                             decoder_num_heads=3, vocab="official", legacy_params=True, tokenizer=tok)
    torch.manual_seed(0)
    model = mage.MAGE(config)
    for name in ("mage-vitb-1600.pth", "mage-vitl-1600.pth"):
        torch.save({"model": model.state_dict()}, os.path.join(folder, name))
    torch.save({"state_dict": model.vqgan.state_dict()}, os.path.join(folder, "vqgan_jax_strongaug.ckpt"))


def _needs_cuda(folder: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("the block needs a CUDA GPU")


FIXTURES = {"official-weights": _official_stand_ins, "cuda": _needs_cuda}


pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = python_blocks(os.path.join(ROOT, "README.md"))


def test_readme_has_blocks_and_known_markers():
    assert len(BLOCKS) >= 5
    for block in BLOCKS:
        unknown = set(block.needs) - set(FIXTURES)
        assert not unknown, f"README.md:{block.line}: unknown readme-test marker(s) {unknown}; known: {sorted(FIXTURES)}"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for need in block.needs:
        FIXTURES[need](str(tmp_path))
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
