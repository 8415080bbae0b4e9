"""Reading and writing Hugging Face model directories (and GGUF files through transformers).

:func:`open_hf` validates what it can without reading tensor data (config, file
list, tensor names, shapes, dtypes) and reads tensors lazily, one at a time, so a
conversion holds about one model's worth of tensors at most.  :func:`write_hf_dir`
writes ``config.json`` + ``model.safetensors`` (sharded with an index above
``max_shard_bytes``) + tokenizer files into a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import UsageError
from .hf_config import arch_from_hf_config
from .mapping import HF_IGNORED_SUFFIXES, HF_LM_HEAD, LlamaShape

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PT_BIN, PT_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(name: str) -> torch.dtype:
    key = str(name).replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(key, key)
    if key not in DTYPES:
        raise UsageError(f"unsupported dtype {name!r}; choose float32, bfloat16 or float16")
    return DTYPES[key]


@dataclass
class HFSource:
    """An opened HF checkpoint: its config, tensor index and a lazy tensor getter."""

    path: str
    config: Dict[str, Any]
    tensors: Dict[str, Tuple[Tuple[int, ...], str]]  # name -> (shape, dtype name)
    getter: Callable[[str], torch.Tensor]
    save_tokenizer: Callable[[Path], bool]
    extra_files: Dict[str, Path] = field(default_factory=dict)
    closers: List[Callable[[], None]] = field(default_factory=list)

    def get(self, name: str) -> torch.Tensor:
        return self.getter(name)

    @property
    def dtype(self) -> str:
        """The dtype of the stored weights (the embedding's)."""
        emb = self.tensors.get("model.embed_tokens.weight")
        return emb[1] if emb else "float32"

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()


# ------------------------------------------------------------------------------ reading
def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: {path} is not valid JSON ({exc})") from None


def _copy_tokenizer_files(src: Path) -> Callable[[Path], bool]:
    present = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]

    def save(dest: Path) -> bool:
        if not present:
            return False
        dest.mkdir(parents=True, exist_ok=True)
        for f in present:
            shutil.copy2(f, dest / f.name)
        return True

    return save


def _open_safetensors(files: List[Path]):
    index: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    where: Dict[str, Any] = {}
    handles = []
    for f in files:
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise UsageError(f"cannot read {f}: {type(exc).__name__}: {exc}") from None
        handles.append(h)
        for name in h.keys():
            sl = h.get_slice(name)
            index[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
            where[name] = h
    return index, (lambda name: where[name].get_tensor(name)), handles


def _open_bin(files: List[Path]):
    index: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read {f}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        for name, t in sd.items():
            if isinstance(t, torch.Tensor):
                tensors[name] = t
                index[name] = (tuple(t.shape), dtype_name(t.dtype))
    return index, tensors.__getitem__


def _weight_files(d: Path) -> Tuple[str, List[Path]]:
    if (d / SAFETENSORS_INDEX).is_file() or (d / SAFETENSORS).is_file():
        kind, single, index = "safetensors", SAFETENSORS, SAFETENSORS_INDEX
    elif (d / PT_BIN_INDEX).is_file() or (d / PT_BIN).is_file():
        kind, single, index = "bin", PT_BIN, PT_BIN_INDEX
    else:
        raise UsageError(
            f"--hf {str(d)!r} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PT_BIN} or {PT_BIN_INDEX}"
        )
    if (d / index).is_file():
        weight_map = _read_json(d / index, "weight index").get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing or not names:
            raise UsageError(f"--hf {str(d)!r}: {index} lists missing shard file(s): {', '.join(missing) or 'none listed'}")
        return kind, [d / n for n in names]
    return kind, [d / single]


def open_hf(path: str) -> HFSource:
    """Open an HF model directory (config.json + safetensors or pytorch_model.bin,
    sharded or not) or a ``.gguf`` file (dequantised through transformers)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--hf {path!r} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return _open_gguf(p)
        raise UsageError(f"--hf {path!r} is a file but not a .gguf; give an HF model directory or a .gguf file")
    cfg = _read_json(p / "config.json", f"--hf {path!r}")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(cfg["quantization_config"], dict) else "?"
        raise UsageError(f"--hf {path!r} is quantized ({method}); convert an unquantized (fp32/bf16/fp16) checkpoint")
    kind, files = _weight_files(p)
    if kind == "safetensors":
        index, getter, handles = _open_safetensors(files)
        closers = [lambda hs=handles: hs.clear()]
    else:
        index, getter = _open_bin(files)
        closers = []
    extra = {GENERATION_CONFIG: p / GENERATION_CONFIG} if (p / GENERATION_CONFIG).is_file() else {}
    return HFSource(str(p), cfg, index, getter, _copy_tokenizer_files(p), extra, closers)


def _open_gguf(p: Path) -> HFSource:
    try:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises assorted errors (unknown arch, ...)
        raise UsageError(f"cannot read GGUF {str(p)!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)

    arch_from_hf_config(cfg)  # refuse unsupported architectures before the (slow) dequantisation
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop(HF_LM_HEAD, None)
    cfg["architectures"] = [type(model).__name__]
    del model
    index = {k: (tuple(t.shape), dtype_name(t.dtype)) for k, t in sd.items()}

    def save_tokenizer(dest: Path) -> bool:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        dest.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(dest))
        return True

    return HFSource(str(p), cfg, index, sd.__getitem__, save_tokenizer, {}, [sd.clear])


def check_tensors(src: HFSource, shape: LlamaShape, tied: bool) -> None:
    """Refuse missing, unexpected, non-float or mis-shaped tensors (one line, nothing read)."""
    expected = shape.hf_shapes(tied)
    present = {n: v for n, v in src.tensors.items() if not n.endswith(HF_IGNORED_SUFFIXES)}
    if tied:
        present.pop(HF_LM_HEAD, None)  # some tied checkpoints store the alias; transformers ignores it
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"--hf {src.path!r}: tensor {missing[0]} is missing{more}")
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        name = unexpected[0]
        hint = " (biases are not supported)" if name.endswith(".bias") else ""
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UsageError(f"--hf {src.path!r}: unexpected tensor {name}{hint}{more}; not a plain Llama checkpoint")
    for name, want in expected.items():
        got, dt = present[name]
        if tuple(got) != tuple(want):
            raise UsageError(
                f"--hf {src.path!r}: tensor {name} has shape {tuple(got)}, but config.json implies {tuple(want)}"
            )
        if dt not in DTYPES:
            raise UsageError(f"--hf {src.path!r}: tensor {name} has dtype {dt}; only float32/bfloat16/float16 weights are supported")


# ------------------------------------------------------------------------------ writing
def _owning(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns its whole storage (safetensors refuses shared storage)."""
    t = t.detach().contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_safetensors(out: Path, tensors: Dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index; returns the files."""

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file({k: _owning(v) for k, v in shards[0].items()}, str(out / SAFETENSORS), metadata={"format": "pt"})
        return [SAFETENSORS]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _owning(v) for k, v in shard.items()}, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files + [SAFETENSORS_INDEX]


def generation_config(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    return gen or None


# ------------------------------------------------------------------------------ atomic output
def check_new_output(out: str, flag: str = "--out") -> Path:
    """The output must not exist yet (or be an empty directory)."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UsageError(f"{flag} {out!r} already exists and is not empty; choose a new directory")
    if not p.parent.exists():
        raise UsageError(f"{flag} {out!r}: parent directory {str(p.parent)!r} does not exist")
    return p


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Write into a hidden sibling and rename into place on success; remove it on failure."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # an empty directory we were allowed to fill
        out.rmdir()
    os.replace(tmp, out)
