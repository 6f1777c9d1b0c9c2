"""OCI images for a real node, built without Docker or a registry.

- the sandbox ("pause") image: the static binary built by ``scripts/realnode-build``;
- the trainer image, laid out as ``trainer-image/Dockerfile`` describes it: a Debian
  (bookworm) base from Debian's packages, extracted; CPython in ``/usr/local`` as the
  ``python:3.11-slim`` images have it; the ``trainer`` extra at the torch of the
  Dockerfile's base image (the pins of ``requirements/torch-floor.lock``); the forge
  package itself; the Dockerfile's ENV, user 10001, directories, entrypoint and command (not the
  C compiler the Dockerfile adds for torch.compile on GPUs: on the CPU node the trainer runs eager
  by default, and refuses ``training.compile: true`` without a compiler);
- the operator image, as the ``Dockerfile`` at the repository root describes it: the same
  base, a virtualenv in ``/opt/forge`` with the ``operator`` extra (pinned by
  ``requirements/dev.lock``, no torch) and forge, ``forge operator`` as its entrypoint.

Each image is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) with
uncompressed layers, cached per machine under ``~/.cache/forge/images/<name>-<key>``
(the key hashes every input), and imported into containerd with
``ctr images import``, where it is also tagged with the name the Helm chart's values give it
(so that the chart's defaults find it on the node) and the image's previous versions are
removed. Only the standard library, ``uv`` (for the wheels: from its cache, or the package index
where a fresh machine's cache lacks a resolution) and ``apt-get download``/``dpkg-deb`` (for the
Debian packages) are used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FORGE_IMAGE_CACHE") or
             Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forge" / "images")
DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"
OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
FLOOR_LOCK = ROOT / "requirements" / "torch-floor.lock"
TRAINER_UID = 10001
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_36"  # the glibc of the Debian (bookworm) base
PAUSE_IMAGE = "forge.dev/pause"
TRAINER_IMAGE = "forge.dev/forge-trainer"
OPERATOR_IMAGE = "forge.dev/forge-operator"
CHART = ROOT / "helm" / "forge"

# The Debian packages under CPython, its extension modules and the wheels' native code
# (libstdc++ for torch); /bin/sh from dash.
DEBIAN_PACKAGES = (
    "base-files", "netbase", "dash", "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libbz2-1.0",
    "liblzma5", "libzstd1", "libffi8", "libssl3", "libsqlite3-0", "libncursesw6", "libtinfo6",
    "libreadline8", "libuuid1", "libnsl2", "libtirpc3", "libtirpc-common", "libgssapi-krb5-2",
    "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1", "libcrypt1",
    "libgdbm6", "libgdbm-compat4", "libdb5.3", "libexpat1", "libbsd0", "libmd0",
)
# left out of /usr/local as python:3.11-slim leaves them out (or never needs them)
PYTHON_EXCLUDES = re.compile(
    r"^lib/python3\.\d+/(test|idlelib|tkinter|turtledemo|site-packages/(?!pip[-/]|$))|"
    r"^lib/python3\.\d+/lib-dynload/_tkinter|^lib/python3\.\d+/config-[^/]*/.*\.a$|^lib/libpython.*\.a$|"
    r"^share/|^include/")

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
SOURCE_DATE_EPOCH = 1704067200  # 2024-01-01


@dataclass
class Image:
    name: str          # e.g. forge.dev/forge-trainer:5f0c...
    layout: Path       # the OCI image layout in the cache
    aliases: tuple[str, ...] = ()  # more names of the same image on a node (the chart's defaults)

    def import_into(self, ctr: Path, address: str, namespace: str = "k8s.io") -> None:
        """Stream the layout as an OCI archive into containerd and unpack it."""
        tar = subprocess.Popen(["tar", "-C", str(self.layout), "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run([*_ctr(ctr, address, namespace), "images", "import",
                            "--platform", "linux/amd64", "--local", "--discard-unpacked-layers", "-"],
                           stdin=tar.stdout, check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"ctr images import {self.name} failed: {e.stderr.decode(errors='replace')}") from e
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()

    def install(self, ctr: Path, address: str, namespace: str = "k8s.io") -> bool:
        """Import the image unless the node has it; point its aliases at it; remove the image's other
        versions (their snapshots are gigabytes). True when it was imported."""
        run = _ctr(ctr, address, namespace)
        present = subprocess.run([*run, "images", "ls", "-q"], check=True, capture_output=True, text=True).stdout.split()
        if self.name not in present:
            self.import_into(ctr, address, namespace)
        for alias in self.aliases:
            subprocess.run([*run, "images", "tag", "--force", self.name, alias], check=True, capture_output=True)
        repository = self.name.rsplit(":", 1)[0]
        remove_images(ctr.parent / "crictl", address,
                      lambda tags: all(t.rsplit(":", 1)[0] == repository and t != self.name for t in tags))
        return self.name not in present


def remove_images(crictl: Path, address: str, stale) -> None:
    """Remove, through the CRI, every image whose names ``stale(names)`` accepts, and those left with no
    name. The CRI keeps its own reference to each image (its ID): removing names with ctr leaves
    the image, and its snapshots, in place."""
    endpoint = f"unix://{address}"
    # removing waits for containerd to collect the snapshots (gigabytes): past crictl's default 2 s
    cri = [str(crictl), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "600s"]
    listed = json.loads(subprocess.run([*cri, "images", "-o", "json"], check=True, capture_output=True,
                                       text=True).stdout)["images"]
    ids = [i["id"] for i in listed if stale(i.get("repoTags") or [])]
    if ids:
        subprocess.run([*cri, "rmi", *ids], check=True, capture_output=True)


def _ctr(ctr: Path, address: str, namespace: str) -> list[str]:
    return [str(ctr), "--address", address, "--namespace", namespace]


# -- layers --------------------------------------------------------------------------------------
class LayerWriter:
    """An uncompressed tar layer written once, hashed as it is written (digest = diff_id)."""

    def __init__(self, path: Path, mtime: int | None = None):
        self.path = path
        self.mtime = mtime  # set: every entry gets it, so that the same files make the same digest
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._size = 0
        self.tar = tarfile.open(fileobj=self, mode="w", format=tarfile.PAX_FORMAT)
        self._dirs: set[str] = set()

    def write(self, data: bytes) -> int:  # file protocol for tarfile
        self._sha.update(data)
        self._size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._size

    def close(self) -> tuple[str, int]:
        self.tar.close()
        self._file.close()
        return "sha256:" + self._sha.hexdigest(), self._size

    def _parents(self, arcname: str) -> None:
        parts = arcname.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self.directory(d)

    def directory(self, arcname: str, mode: int = 0o755, uid: int = 0) -> None:
        arcname = arcname.strip("/")
        if arcname in self._dirs:
            return
        self._parents(arcname)
        info = tarfile.TarInfo(arcname)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
        info.mtime = self.mtime or 0
        self.tar.addfile(info)
        self._dirs.add(arcname)

    def file(self, arcname: str, data: bytes, mode: int = 0o644) -> None:
        arcname = arcname.strip("/")
        self._parents(arcname)
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = len(data), mode
        info.mtime = self.mtime or 0
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, arcname: str, target: str) -> None:
        arcname = arcname.strip("/")
        self._parents(arcname)
        info = tarfile.TarInfo(arcname)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        info.mtime = self.mtime or 0
        self.tar.addfile(info)

    def tree(self, src: Path, dest: str, exclude: re.Pattern | None = None,
             rewrite=None) -> None:
        """Add ``src`` under ``dest`` (owned by root), in a stable order; ``rewrite(rel, data)``
        may change a regular file's content (None: keep it)."""
        dest = dest.strip("/")
        if dest:
            self.directory(dest)
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep = []
            for name in dirnames:
                rel = f"{rel_dir}/{name}".lstrip("/")
                if exclude is not None and exclude.search(rel + "/"):
                    continue
                full = Path(dirpath, name)
                if full.is_symlink():
                    self._add_path(full, f"{dest}/{rel}".lstrip("/"))
                else:
                    keep.append(name)
                    st = full.stat()
                    self.directory(f"{dest}/{rel}".lstrip("/"), mode=st.st_mode & 0o7777)
            dirnames[:] = keep
            for name in sorted(filenames):
                rel = f"{rel_dir}/{name}".lstrip("/")
                if exclude is not None and exclude.search(rel):
                    continue
                data = None
                full = Path(dirpath, name)
                if rewrite is not None and full.is_file() and not full.is_symlink():
                    data = rewrite(rel, full)
                if data is not None:
                    self.file(f"{dest}/{rel}".lstrip("/"), data, mode=full.stat().st_mode & 0o7777)
                else:
                    self._add_path(full, f"{dest}/{rel}".lstrip("/"))

    def _add_path(self, full: Path, arcname: str) -> None:
        info = self.tar.gettarinfo(str(full), arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if self.mtime is not None:
            info.mtime = self.mtime
        if info.isreg():
            with open(full, "rb") as f:
                self.tar.addfile(info, f)
        else:
            self.tar.addfile(info)


def write_layout(out: Path, name: str, layers: list[tuple[str, int, Path]], config: dict) -> Image:
    """An OCI image layout from finished layers ((digest, size, path) each) and an image config."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, _, path in layers:
        path.rename(blobs / digest.removeprefix("sha256:"))
    config = {**config, "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [d for d, _, _ in layers]}}

    def blob(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    config_digest, config_size = blob(config)
    manifest_digest, manifest_size = blob({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": d, "size": s} for d, s, _ in layers],
    })
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
        }],
    }))
    return Image(name, out)


def _cached(name: str, key: str, build) -> Image:
    """The image ``name:key`` from the cache, or built into a temporary folder and moved there."""
    final = CACHE / f"{name.rsplit('/', 1)[-1]}-{key}"
    ref = f"{name}:{key}"
    if (final / "index.json").exists():
        return Image(ref, final)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
    try:
        build(tmp, ref)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in CACHE.glob(f"{name.rsplit('/', 1)[-1]}-*"):  # the trainer image is 5 GB: keep one
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Image(ref, final)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


# -- the pause image -----------------------------------------------------------------------------
def pause_image(bin_dir: Path) -> Image:
    binary = (bin_dir / "pause").read_bytes()

    def build(tmp: Path, ref: str) -> None:
        layer = LayerWriter(tmp / "layer.tar")
        layer.file("pause", binary, mode=0o755)
        digest, size = layer.close()
        write_layout(tmp / "oci", ref, [(digest, size, tmp / "layer.tar")],
                     {"config": {"Entrypoint": ["/pause"], "User": "65535:65535"}})
        for p in (tmp / "oci").iterdir():
            p.rename(tmp / p.name)

    return _cached(PAUSE_IMAGE, _digest(binary), build)


# -- the Python images (trainer, operator) ---------------------------------------------------------
@dataclass
class DockerfileSpec:
    """What a Dockerfile of ours says about its image (the parts the built image must match); only its
    last stage counts, except for the extra it installs and the constraints it installs it with."""
    torch_version: str | None   # the pytorch/pytorch base image's torch; None on a plain Python base
    env: dict[str, str]
    user: str
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    directories: list[str]
    extra: str
    venv: str | None            # `python -m venv <path>`: the packages live in that virtualenv
    constraints: str | None     # `--constraint <lock>`, relative to the repository

    @classmethod
    def parse(cls, text: str = "", dockerfile: Path = DOCKERFILE) -> "DockerfileSpec":
        text = text or dockerfile.read_text()
        flat = re.sub(r"\\\n\s*", " ", text)
        stages = re.split(r"^FROM\s", flat, flags=re.M | re.I)
        base = stages[-1].split(None, 1)[0]
        instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1].strip() if " " in l.strip() else "")
                 for l in (x.strip() for x in stages[-1].splitlines()[1:]) if l and not l.startswith("#")]
        torch = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)", base)
        if not torch and "pytorch" in base:
            raise ValueError(f"{dockerfile.name}: base image {base!r} is not pytorch/pytorch:<torch version>-...")
        env: dict[str, str] = {}
        for k, v in instr:
            if k == "ENV":
                env.update(dict(re.findall(r"(\w+)=(\S+)", v)))
        values = lambda key: [v for k, v in instr if k == key]  # noqa: E731
        extra = re.search(r'"\.\[(\w+)\]"', text)
        dirs = re.search(r"mkdir -p ([^&\n]+)", stages[-1])
        venv = re.search(r"python -m venv (\S+)", flat)
        constraints = re.search(r"--constraint (\S+)", flat)
        return cls(torch_version=torch.group(1) if torch else None, env=env, user=values("USER")[-1],
                   workdir=(values("WORKDIR") or ["/"])[-1],
                   entrypoint=json.loads(values("ENTRYPOINT")[-1]),
                   cmd=json.loads(values("CMD")[-1]) if values("CMD") else [],
                   directories=dirs.group(1).split() if dirs else [],
                   extra=extra.group(1) if extra else "trainer",
                   venv=venv.group(1) if venv else None,
                   constraints=constraints.group(1) if constraints else None)

    @property
    def prefix(self) -> str:
        """Where the packages and their console scripts go: the virtualenv, or the base's /usr/local."""
        return self.venv or "/usr/local"


def operator_spec() -> DockerfileSpec:
    return DockerfileSpec.parse(dockerfile=OPERATOR_DOCKERFILE)


def _venv() -> Path:
    """The project's virtualenv (scripts/setup-dev): its Python and uv build the image."""
    for candidate in (ROOT / ".venv", Path(sys.prefix)):
        if (candidate / "pyvenv.cfg").exists():
            return candidate
    raise RuntimeError("no virtualenv: run scripts/setup-dev")


def _uv() -> str:
    for candidate in (_venv() / "bin" / "uv", Path(sys.executable).parent / "uv"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if not found:
        raise RuntimeError("uv not found: run scripts/setup-dev")
    return found


def base_python() -> Path:
    """The CPython installation copied to /usr/local: the one the project's virtualenv comes from."""
    cfg = dict(line.split(" = ", 1) for line in (_venv() / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    return Path(os.path.realpath(cfg["home"])).parent


def _python_version(python: Path) -> str:
    return subprocess.run([str(python / "bin" / "python3"), "-c", "import sys; print(sys.version)"],
                          check=True, capture_output=True, text=True).stdout.strip()


def requirements(spec: DockerfileSpec) -> str:
    """The Dockerfile's `pip install ".[<extra>]"`, pinned as it pins it: by its constraints file, or
    (the trainer) at its base image's torch as the floor lock pins it."""
    lock = ROOT / spec.constraints if spec.constraints else FLOOR_LOCK
    if spec.torch_version and f"\ntorch=={spec.torch_version}\n" not in f"\n{lock.read_text()}":
        raise RuntimeError(f"{lock.relative_to(ROOT)} does not pin torch=={spec.torch_version}, "
                           f"the torch of trainer-image/Dockerfile's base image")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "requirements.txt"
        subprocess.run(
            [_uv(), "pip", "compile", "-q", str(ROOT / "pyproject.toml"), "--extra", spec.extra,
             "-c", str(lock), "--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM,
             "--no-header", "--no-annotate", "-o", str(out)],
            check=True, capture_output=True, text=True, cwd=ROOT)
        pinned = out.read_text()
    if spec.torch_version and f"\ntorch=={spec.torch_version}\n" not in f"\n{pinned}":
        raise RuntimeError(f"the trainer extra did not resolve to torch=={spec.torch_version}:\n{pinned}")
    return pinned


def _source_digest() -> bytes:
    h = hashlib.sha256()
    for top in ("operator/forge_operator", "trainer-image/forge_trainer"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    for name in ("pyproject.toml", "README.md"):
        h.update((ROOT / name).read_bytes())
    return h.digest()


def _debian_rootfs(dest: Path) -> None:
    debs = dest / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, check=True, capture_output=True)
    root = dest / "rootfs"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    shutil.rmtree(debs)
    for doc in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian"):
        shutil.rmtree(root / doc, ignore_errors=True)


def _python_ignore(python: Path):
    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = os.path.relpath(directory, python)
        rel = "" if rel == "." else rel + "/"
        return [n for n in names if PYTHON_EXCLUDES.search(rel + n + ("/" if Path(directory, n).is_dir() else ""))]
    return ignore


def _shebang_for(prefix: str):
    """Console scripts from uv name the build's interpreter: point them at the image's."""
    def rewrite(rel: str, path: Path) -> bytes | None:
        data = path.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            return f"#!{prefix}/bin/python3\n".encode() + data.split(b"\n", 1)[1]
        return None
    return rewrite


def _base_layer(tmp: Path, spec: DockerfileSpec, python: Path) -> tuple[str, int, Path]:
    """Debian base, CPython in /usr/local (with the loader's cache), the user, the Dockerfile's directories
    and its virtualenv's skeleton."""
    _debian_rootfs(tmp)
    rootfs = tmp / "rootfs"
    shutil.copytree(python, rootfs / "usr" / "local", symlinks=True, ignore=_python_ignore(python))
    if not (rootfs / "usr" / "local" / "bin" / "python").exists():
        (rootfs / "usr" / "local" / "bin" / "python").symlink_to("python3")
    if not (rootfs / "bin" / "sh").exists():
        (rootfs / "bin" / "sh").symlink_to("dash")
    (rootfs / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (rootfs / "etc" / "ld.so.conf.d" / "usr-local.conf").write_text("/usr/local/lib\n")
    subprocess.run(["ldconfig", "-r", str(rootfs)], check=True)
    base = LayerWriter(tmp / "base.tar")
    base.tree(rootfs, "")
    base.directory("tmp", mode=0o1777)
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
              b"forge:x:10001:10001::/home/forge:/usr/sbin/nologin\n")
    base.file("etc/group", b"root:x:0:\nforge:x:10001:\n")
    base.directory("home/forge", mode=0o755, uid=TRAINER_UID)
    for d in spec.directories:
        base.directory(d, mode=0o755, uid=TRAINER_UID)
    if spec.venv:
        venv = spec.venv.strip("/")
        base.file(f"{venv}/pyvenv.cfg", f"home = /usr/local/bin\ninclude-system-site-packages = false\n"
                  f"version = {_python_version(python).split()[0]}\n".encode())
        for name in ("python", "python3", f"python{PYTHON_VERSION}"):
            base.symlink(f"{venv}/bin/{name}", "/usr/local/bin/python3")
    shutil.rmtree(rootfs)
    return (*base.close(), tmp / "base.tar")


def _package_layers(tmp: Path, spec: DockerfileSpec, pinned: str) -> list[tuple[str, int, Path]]:
    """The extra's wheels, then forge itself: one layer each, with fixed times (no byte code is shipped
    in them), so that the same wheels make the same layer, which a node that has it unpacked already
    does not unpack again."""
    site, app = tmp / "site", tmp / "app"
    (tmp / "requirements.txt").write_text(pinned)
    uv = [_uv(), "pip", "install", "-q", "--python", str(_venv() / "bin" / "python"), "--no-deps",
          "--link-mode", "hardlink"]
    subprocess.run([*uv, "--target", str(site), "-r", str(tmp / "requirements.txt")], check=True)
    subprocess.run([*uv, "--target", str(app), str(ROOT)], check=True, cwd=tmp)
    prefix = spec.prefix.strip("/")
    layers = []
    for name, src in (("deps", site), ("forge", app)):
        layer = LayerWriter(tmp / f"{name}.tar", mtime=SOURCE_DATE_EPOCH)
        layer.tree(src, f"{prefix}/lib/python{PYTHON_VERSION}/site-packages", exclude=re.compile(r"^bin/"))
        if (src / "bin").exists():
            layer.tree(src / "bin", f"{prefix}/bin", rewrite=_shebang_for(spec.prefix))
        layers.append((*layer.close(), tmp / f"{name}.tar"))
        shutil.rmtree(src)
    (tmp / "requirements.txt").unlink()
    return layers


BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


def _image_env(spec: DockerfileSpec) -> dict[str, str]:
    """The Dockerfile's ENV over the base image's, `$PATH` expanded as docker build expands it."""
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
    for key, value in spec.env.items():
        env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


def python_image(spec: DockerfileSpec, name: str, aliases: tuple[str, ...] = ()) -> Image:
    """The image a Dockerfile of ours describes, built from this machine's CPython, Debian packages and
    uv's cache of wheels (cached by a key of every input)."""
    pinned = requirements(spec)
    python = base_python()
    key = _digest(pinned.encode(), _source_digest(), " ".join(DEBIAN_PACKAGES).encode(),
                  str(python).encode(), _python_version(python).encode(), json.dumps(spec.__dict__, sort_keys=True).encode(),
                  Path(__file__).read_bytes())

    def build(tmp: Path, ref: str) -> None:
        layers = [_base_layer(tmp, spec, python), *_package_layers(tmp, spec, pinned)]
        write_layout(tmp / "oci", ref, layers, {
            "config": {"Env": [f"{k}={v}" for k, v in _image_env(spec).items()], "User": spec.user,
                       "WorkingDir": spec.workdir, "Entrypoint": spec.entrypoint, "Cmd": spec.cmd},
        })
        for p in (tmp / "oci").iterdir():
            p.rename(tmp / p.name)

    image = _cached(name, key, build)
    image.aliases = aliases
    return image


def chart_images() -> dict[str, str]:
    """The images the Helm chart's default values name: {"operator": ..., "trainer": ...}."""
    import yaml  # the project's virtualenv builds the images

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return {"operator": f"{values['image']['repository']}:{values['image']['tag'] or app_version}",
            "trainer": values["trainerImage"]}


def trainer_image(spec: DockerfileSpec | None = None) -> Image:
    """trainer-image/Dockerfile's image, also named as the chart's trainerImage."""
    return python_image(spec or DockerfileSpec.parse(), TRAINER_IMAGE, (chart_images()["trainer"],))


def operator_image() -> Image:
    """The root Dockerfile's image (`forge operator`), also named as the chart's operator image."""
    return python_image(operator_spec(), OPERATOR_IMAGE, (chart_images()["operator"],))


# -- reading a built image back ------------------------------------------------------------------
def image_config(image: Image) -> dict:
    manifest = _manifest(image)
    return json.loads(_blob(image, manifest["config"]["digest"]).read_text())


def _manifest(image: Image) -> dict:
    index = json.loads((image.layout / "index.json").read_text())
    return json.loads(_blob(image, index["manifests"][0]["digest"]).read_text())


def _blob(image: Image, digest: str) -> Path:
    return image.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def installed_distributions(image: Image) -> dict[str, str]:
    """{normalised name: version} of every *.dist-info in the image's site-packages."""
    found: dict[str, str] = {}
    for layer in _manifest(image)["layers"]:
        with tarfile.open(_blob(image, layer["digest"])) as tar:
            for member in tar:
                m = re.search(r"site-packages/([^/]+)-([^-/]+)\.dist-info/METADATA$", member.name)
                if m:
                    found[normalise(m.group(1))] = m.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Build the node images (OCI layouts, cached); print where.")
    parser.add_argument("image", choices=["trainer", "operator", "pause"])
    parser.add_argument("--bin-dir", help="scripts/realnode-build's folder (for pause)")
    args = parser.parse_args(argv)
    build = {"trainer": trainer_image, "operator": operator_image, "pause": lambda: pause_image(Path(args.bin_dir))}
    image = build[args.image]()
    print(image.name)
    print(image.layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
