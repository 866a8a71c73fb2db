#!/usr/bin/env python3
"""Fetches Apache HttpClient 5 / HttpCore 5 jars (>= 5.4) from Debian unstable's archive for the
Spark reader (dev/setup.sh): Iceberg 1.10's REST client needs them, and bookworm and trixie
ship 5.2. The package files are found in unstable's package index and checked against the
SHA256 it lists; the jars are extracted with dpkg-deb.

Usage: debian_jars.py <output dir>   (writes httpclient5.jar, httpcore5.jar, httpcore5-h2.jar)
"""
import glob
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

MIRROR = "http://deb.debian.org/debian"
PACKAGES = {"libhttpclient5-java": ["httpclient5"], "libhttpcore5-java": ["httpcore5", "httpcore5-h2"]}


def index():
    with urllib.request.urlopen(f"{MIRROR}/dists/sid/main/binary-all/Packages.xz", timeout=300) as r:
        text = lzma.decompress(r.read()).decode()
    entries = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") in PACKAGES:
            entries[fields["Package"]] = fields
    return entries


def main(out):
    os.makedirs(out, exist_ok=True)
    entries = index()
    with tempfile.TemporaryDirectory() as work:
        for package, jars in PACKAGES.items():
            e = entries.get(package)
            if not e:
                sys.exit(f"{package} is not in Debian unstable's index")
            with urllib.request.urlopen(f"{MIRROR}/{e['Filename']}", timeout=300) as r:
                data = r.read()
            if hashlib.sha256(data).hexdigest() != e["SHA256"]:
                sys.exit(f"{e['Filename']}: SHA256 does not match the archive's index")
            deb = os.path.join(work, package + ".deb")
            with open(deb, "wb") as f:
                f.write(data)
            root = os.path.join(work, package)
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
            for jar in jars:
                found = [p for p in glob.glob(f"{root}/usr/share/maven-repo/**/{jar}/*/{jar}-*.jar", recursive=True)
                         if "/debian/" not in p]
                if not found:
                    sys.exit(f"{jar}.jar not found in {e['Filename']}")
                shutil.copy(found[0], os.path.join(out, f"{jar}.jar"))
                print(f"{jar}.jar <- {os.path.basename(found[0])} ({package} {e['Version']})", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
