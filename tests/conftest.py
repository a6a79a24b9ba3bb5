"""Session fixtures: the zoo trained once per session, tiny random Hugging Face models, and a
database filled by the real heads pipeline. All read-only once built.

Portability: a test whose outcome depends on a training run or on float reduction order is
marked `numerics` (every test that uses a trained zoo model or SAE is marked automatically);
`make test-portable` reruns them with other CPU kernels and one thread. `WORKBENCH_TEST_SEED`
trains the zoo models and SAEs with another seed (another valid training), and the `measured`
fixture appends each measured quantity to `$WORKBENCH_MEASURE_FILE` (JSON lines) so that
`make spread` can report its range over seeds and kernels, the spread written beside each
threshold."""

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

ZOO_STEPS = 1000
ZOO_SAVE_EVERY = 100
SEED = int(os.environ.get("WORKBENCH_TEST_SEED", "0"))
TRAINED_FIXTURES = {"zoo_root", "ioi_dir", "sae_run", "graph_store"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & _closure(item):
            item.add_marker(pytest.mark.numerics)


def _closure(item: pytest.Item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    return set(info.names_closure) if info is not None else set()


@pytest.fixture
def measured(request: pytest.FixtureRequest):
    """`measured(name, value)`: record a quantity a threshold is checked against."""
    out = os.environ.get("WORKBENCH_MEASURE_FILE")

    def record(name: str, value: float) -> float:
        if out:
            row = {
                "test": request.node.nodeid,
                "name": name,
                "value": float(value),
                "seed": SEED,
                "kernel": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                "threads": os.environ.get("OMP_NUM_THREADS", ""),
            }
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return value

    return record


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.zoo import TrainConfig, train_zoo_model

    root = tmp_path_factory.mktemp("zoo")
    train_zoo_model(
        TrainConfig(
            task="induction", out=str(root), steps=ZOO_STEPS, save_every=ZOO_SAVE_EVERY, seed=SEED
        )
    )
    return root


@pytest.fixture(scope="session")
def ioi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.zoo import TrainConfig, train_zoo_model

    root = tmp_path_factory.mktemp("zoo-ioi")
    train_zoo_model(TrainConfig(task="ioi", out=str(root), steps=600, save_every=100, seed=SEED))
    return root / "ioi"


@dataclass(frozen=True)
class GraphStore:
    db: Path
    set_id: str
    graph_id: str


@pytest.fixture(scope="session")
def graph_store(tmp_path_factory: pytest.TempPathFactory, ioi_dir: Path) -> GraphStore:
    """Transcoders trained on the IOI zoo model (`workbench run transcoders`) and the
    attribution graph of the IOI task's first prompt (`workbench run graph`), stored."""
    from workbench.cli import cli
    from workbench.store import Store

    db = tmp_path_factory.mktemp("tc") / "w.duckdb"
    argv = ["run", "transcoders", "--model", str(ioi_dir), "--task", "ioi", "--db", str(db)]
    argv += ["--training-tokens", "60000", "--corpus-tokens", "12000", "--seed", str(SEED)]
    assert cli(argv) == 0
    with Store(db, read_only=True) as store:
        (set_id,) = store.query("SELECT set_id FROM transcoder_sets")["set_id"].to_pylist()
    argv = ["run", "graph", "--model", str(ioi_dir), "--transcoders", set_id]
    argv += ["--task", "ioi", "--index", "0", "--db", str(db)]
    assert cli(argv) == 0
    with Store(db, read_only=True) as store:
        (graph_id,) = store.query("SELECT graph_id FROM graphs")["graph_id"].to_pylist()
    return GraphStore(db, set_id, graph_id)


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
    elif kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
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
    kinds = ("gpt2", "gpt2_no_n_ctx", "gpt_neox", "llama")
    return {kind: _save_tiny_hf(kind, root / kind) for kind in kinds}


@pytest.fixture(scope="session")
def trainer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer") / "run"
    for step, seed in ((10, 1), (20, 2)):
        _save_tiny_hf("gpt2", root / f"checkpoint-{step}", seed=seed)
    return root


WHY_TARGET = "igloo"  # a word of the zoo's vocabulary: one token


@pytest.fixture(scope="session")
def why_db(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> tuple[Path, list[str]]:
    """A database with `workbench run prompt` of the induction task's prompt 1 on the zoo's
    final checkpoint: its views, the input attribution of WHY_TARGET by every method that
    applies, its Patchscope, and a briefly trained tuned lens's predictions; with the command
    line that made it."""
    from workbench.cli import cli

    db = tmp_path_factory.mktemp("why") / "w.duckdb"
    lens = ["run", "tuned-lens", "--model", str(induction_dir), "--task", "induction"]
    lens += ["--steps", "4", "--tokens-per-step", "1024", "--corpus-tokens", "4096"]
    assert cli([*lens, "--db", str(db)]) == 0
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "1"]
    argv += ["--target", WHY_TARGET, "--db", str(db)]
    assert cli(argv) == 0
    return db, argv


@pytest.fixture(scope="session")
def heads_db(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> Path:
    """A database filled by the heads and patching pipelines and the head catalogue over every
    zoo checkpoint, by the edges pipeline (eap, exact_edge) at steps 500 and 1000, and the
    cross-recovery of those two eap circuits; attr_patch and eap with spot checks of 8."""
    from workbench.catalogue.run import run_catalogue
    from workbench.crossrecovery import run_cross_recovery
    from workbench.jobs import RunOptions
    from workbench.runner import run

    db = tmp_path_factory.mktemp("db") / "workbench.duckdb"
    every = RunOptions(model=str(induction_dir), task="induction", checkpoint="all", db=str(db))
    outcomes = run("heads", every, spot_checks=8)  # attr_patch with a spot check
    outcomes += run("patching", every)
    for step in ("500", "1000"):
        at_step = RunOptions(
            model=str(induction_dir), task="induction", checkpoint=step, db=str(db)
        )
        outcomes += run("edges", at_step, ["eap", "exact_edge"], spot_checks=8)
    assert all(o.status == "done" for o in outcomes)
    stored = run_catalogue(str(induction_dir), checkpoint="all", db=str(db))
    assert {status for _, status in stored} == {"done"}
    evaluated = run_cross_recovery(
        RunOptions(model=str(induction_dir), task="induction", db=str(db))
    )
    assert [status for _, status in evaluated] == ["done", "done"]  # steps 500 and 1000
    return db


HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def permute_heads(checkpoint: Path, out: Path) -> Path:
    """A copy of a zoo checkpoint directory with the heads of every layer in reverse order:
    the same function, each head under another index (`a{l}.h{i}` is `a{l}.h{n-1-i}`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    weights = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in weights.items():
        if name.split(".")[-1] in HEAD_WEIGHTS:
            weights[name] = tensor.flip(0).contiguous()
    save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="session")
def permuted_dir(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> Path:
    """A training run of one checkpoint: the induction model's last, its heads renumbered
    (`permute_heads`)."""
    last = max(induction_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    root = tmp_path_factory.mktemp("permuted") / "induction"
    permute_heads(last, root / last.name)
    return root


@pytest.fixture(scope="session")
def seeds_db(
    tmp_path_factory: pytest.TempPathFactory,
    heads_db: Path,
    induction_dir: Path,
    permuted_dir: Path,
) -> Path:
    """A copy of `heads_db` in which the induction model and its renumbered copy are a seed
    group, their eap circuits at step 1000 (with spot checks of 8, as `heads_db`'s) evaluated
    on each other's model."""
    import shutil

    from workbench.jobs import RunOptions
    from workbench.seeds import run_seeds

    db = tmp_path_factory.mktemp("seeds") / "workbench.duckdb"
    shutil.copy(heads_db, db)
    options = RunOptions(model=str(induction_dir), task="induction", db=str(db))
    result = run_seeds([str(induction_dir), str(permuted_dir)], options, spot_checks=8)
    assert [o.status for o in result.outcomes] == ["skipped", "done"]
    return db


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


NORMALISATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)


def _save_norm_model(norm: str | None, out: Path) -> Path:
    """A zoo-format checkpoint (no tokenizer) of a small random model with MLPs and the given
    normalisation; LayerNorm and RMSNorm weights are random too, so folding them matters."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.models.zoo_format import save_zoo_checkpoint

    cfg_kwargs = {
        "n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64, "d_vocab": 61,
        "n_ctx": 32, "act_fn": "gelu", "normalization_type": norm, "seed": 0,
    }  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**cfg_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-2].startswith("ln"):
                param.add_(0.3 * torch.randn_like(param))
    save_zoo_checkpoint(
        out, cfg_kwargs=cfg_kwargs, state_dict=model.state_dict(), tokenizer=None,
        meta={"task": "random", "step": 0, "seed": 0},
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def norm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, Path]:
    """One random zoo-format model per normalisation TransformerLens supports."""
    root = tmp_path_factory.mktemp("norms")
    return {norm: _save_norm_model(norm, root / str(norm)) for norm in NORMALISATIONS}


# SAE fixtures: two SAEs trained once per session on the induction zoo model through the CLI.
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
CORPUS_TOKENS = 24_000


@dataclass(frozen=True)
class SaeRun:
    db: Path
    sae_dir: Path
    saes: dict[str, dict]  # hook -> saes row


def query(db: Path, sql: str, params: list | None = None) -> list[dict]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="session")
def sae_run(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> SaeRun:
    from workbench.cli import cli

    root = tmp_path_factory.mktemp("sae")
    db = root / "w.duckdb"
    argv = ["run", "sae", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    for hook in HOOKS:
        argv += ["--hook", hook]
    argv += ["--training-tokens", "200000", "--corpus-tokens", str(CORPUS_TOKENS)]
    argv += ["--seed", str(SEED)]
    assert cli(argv) == 0
    rows = query(db, "SELECT * FROM saes")
    return SaeRun(db=db, sae_dir=root / "saes", saes={r["hook"]: r for r in rows})
