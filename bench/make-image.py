#!/usr/bin/env python3
"""Writes an OCI image layout of about `MB` megabytes of the host's files, in three gzip
layers (an image like a language runtime's), for the pull benchmark.

Usage: make-image.py LAYOUT_DIR MB
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def files(roots, budget):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                size = os.path.getsize(path)
                if size > budget[0]:
                    continue
                budget[0] -= size
                yield path
                if budget[0] <= 0:
                    return


def main():
    layout, mb = sys.argv[1], int(sys.argv[2])
    os.makedirs(f"{layout}/blobs/sha256", exist_ok=True)

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(f"{layout}/blobs/sha256/{digest}", "wb") as f:
            f.write(data)
        return f"sha256:{digest}", len(data)

    sources = [["/usr/lib/python3.11"], ["/usr/share/perl", "/usr/share/doc"], ["/usr/lib/x86_64-linux-gnu"]]
    # /usr/bin/true and what it loads, so that a sandbox on the image can run something.
    base = ["/usr/bin/true", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/ld-linux-x86-64.so.2"]
    per_layer = mb * 1024 * 1024 // len(sources)
    layers, diff_ids = [], []
    for roots in sources:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            if roots is sources[0]:
                for link, target in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")]:
                    info = tarfile.TarInfo(link)
                    info.type = tarfile.SYMTYPE
                    info.linkname = target
                    tar.addfile(info)
                for path in base:
                    real = os.path.realpath(path)
                    tar.add(real, arcname=path.lstrip("/"))
            for path in files(roots, [per_layer]):
                tar.add(path, arcname=path.lstrip("/"))
        data = raw.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        digest, size = blob(gzip.compress(data, compresslevel=6))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    config_digest, config_size = blob(config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers,
    }).encode()
    manifest_digest, manifest_size = blob(manifest)
    with open(f"{layout}/index.json", "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "1"},
        }]}, f)
    with open(f"{layout}/oci-layout", "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    total = sum(l["size"] for l in layers)
    print(f"{len(layers)} layers, {total / 1e6:.0f} MB compressed", file=sys.stderr)


if __name__ == "__main__":
    main()
