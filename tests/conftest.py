"""Session fixtures: the zoo trained once per session, tiny random Hugging Face models, and a
database filled by the real heads pipeline. All read-only once built."""

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

ZOO_STEPS = 1000
ZOO_SAVE_EVERY = 100


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.zoo import TrainConfig, train_zoo_model

    root = tmp_path_factory.mktemp("zoo")
    train_zoo_model(
        TrainConfig(task="induction", out=str(root), steps=ZOO_STEPS, save_every=ZOO_SAVE_EVERY)
    )
    return root


@pytest.fixture(scope="session")
def ioi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.zoo import TrainConfig, train_zoo_model

    root = tmp_path_factory.mktemp("zoo-ioi")
    train_zoo_model(TrainConfig(task="ioi", out=str(root), steps=600, save_every=100))
    return root / "ioi"


@pytest.fixture(scope="session")
def induction_dir(zoo_root: Path) -> Path:
    return zoo_root / "induction"


@pytest.fixture(scope="session")
def induction_final(induction_dir: Path):
    from workbench.models import load_checkpoint, resolve_checkpoints

    return load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])


@pytest.fixture(scope="session")
def induction_task(induction_final):
    from workbench.tasks import load_task

    return load_task("induction", induction_final)


def _save_tiny_hf(kind: str, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, n_ctx=64)
        model = GPT2LMHeadModel(cfg)
    elif kind == "gpt2_no_n_ctx":  # as transformers 5 saves GPT-2: n_positions only
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
            rotary_pct=0.5,
        )
        model = GPTNeoXForCausalLM(cfg)
    model.eval()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    kinds = ("gpt2", "gpt2_no_n_ctx", "gpt_neox")
    return {kind: _save_tiny_hf(kind, root / kind) for kind in kinds}


@pytest.fixture(scope="session")
def trainer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer") / "run"
    for step, seed in ((10, 1), (20, 2)):
        _save_tiny_hf("gpt2", root / f"checkpoint-{step}", seed=seed)
    return root


@pytest.fixture(scope="session")
def heads_db(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> Path:
    """A database filled by the heads and patching pipelines over every zoo checkpoint, and
    by the edges pipeline (eap, exact_edge) at steps 500 and 1000."""
    from pipelines import edges, heads, patching

    db = tmp_path_factory.mktemp("db") / "workbench.duckdb"
    outcomes = heads.run(
        heads.HeadsConfig(model=str(induction_dir), task="induction", checkpoint="all", db=str(db))
    )
    outcomes += patching.run(
        patching.PatchingConfig(
            model=str(induction_dir), task="induction", checkpoint="all", db=str(db)
        )
    )
    for step in ("500", "1000"):
        outcomes += edges.run(
            edges.EdgesConfig(
                model=str(induction_dir),
                task="induction",
                checkpoint=step,
                db=str(db),
                methods=["eap", "exact_edge"],
            )  # fmt: skip
        )
    assert all(o.status == "done" for o in outcomes)
    return db


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
