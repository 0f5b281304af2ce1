#!/usr/bin/env python3
"""Builds the container image from the release binaries, without a container engine.

Writes an image archive holding both an OCI image layout (index.json, for `podman load`,
`skopeo copy oci-archive:...`, containerd's `ctr image import`) and Docker's manifest.json
(for `docker load`). One layer: the binaries in /usr/local/bin, the shared libraries they
link (found with ldd, copied from this machine's Debian), a passwd/group with root, and
the config example. No base image: nothing is pulled from a registry.

usage: image.py BIN_DIR OUT.tar NAME:TAG
"""
import gzip, hashlib, io, json, os, subprocess, sys, tarfile, time

BINARIES = ["kmesh-daemon", "kmesh-cni", "kmeshctl"]


def libraries(paths):
    libs = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.add(parts[2])
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])  # the dynamic loader
    return sorted(libs)


def add_file(tar, src, dst, mode=None, mtime=0):
    data = open(src, "rb").read()
    info = tarfile.TarInfo(dst.lstrip("/"))
    info.size, info.mtime = len(data), mtime
    info.mode = mode if mode is not None else (os.stat(src).st_mode & 0o777)
    tar.addfile(info, io.BytesIO(data))


def add_bytes(tar, dst, data, mode=0o644):
    info = tarfile.TarInfo(dst.lstrip("/"))
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def add_dirs(tar, paths):
    seen = set()
    for p in paths:
        parts = p.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen:
                seen.add(d)
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)


def main():
    bin_dir, out, ref = sys.argv[1], sys.argv[2], sys.argv[3]
    bins = [os.path.join(bin_dir, b) for b in BINARIES]
    for b in bins:
        if not os.access(b, os.X_OK):
            sys.exit(f"image.py: {b} is missing: build the release binaries first")
    libs = libraries(bins)
    files = [(b, "/usr/local/bin/" + os.path.basename(b)) for b in bins]
    # Libraries keep their path (the loader's path is fixed in the binaries), resolved
    # through symlinks to the real file.
    files += [(os.path.realpath(l), l) for l in libs]
    extra = {
        "/etc/passwd": b"root:x:0:0:root:/root:/sbin/nologin\n",
        "/etc/group": b"root:x:0:\n",
        "/etc/kmesh/example.yaml": open("config/example.yaml", "rb").read(),
    }
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        add_dirs(t, [d for _, d in files] + list(extra) + ["/tmp/x", "/var/run/kmesh/x", "/run/x"])
        for src, dst in files:
            add_file(t, src, dst)
        for dst, data in extra.items():
            add_bytes(t, dst, data)
    raw = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = gzip.compress(raw, mtime=0)
    layer_digest = "sha256:" + hashlib.sha256(gz).hexdigest()

    name, _, tag = ref.partition(":")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "Entrypoint": ["/usr/local/bin/kmesh-daemon"],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/image.py (release binaries and their libraries)"}],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(gz)}],
    }, sort_keys=True).encode()
    man_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": f"{ref}"},
        }],
    }, sort_keys=True).encode()
    blob = lambda d: "blobs/sha256/" + d.split(":", 1)[1]
    docker = json.dumps([{"Config": blob(cfg_digest), "RepoTags": [ref], "Layers": [blob(layer_digest)]}]).encode()

    with tarfile.open(out, "w") as t:
        add_bytes(t, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(t, "index.json", index)
        add_bytes(t, "manifest.json", docker)
        for d, data in ((cfg_digest, cfg), (layer_digest, gz), (man_digest, manifest)):
            add_bytes(t, blob(d), data)
    print(f"{out}: {ref}, {len(gz) / 1e6:.1f} MB compressed, {len(files)} files "
          f"({len(libs)} libraries from this machine), manifest {man_digest[:19]}")


if __name__ == "__main__":
    main()
