#!/usr/bin/env python3
"""Prints a deb822 deb-src stanza for the machine's own Debian archive (read
from its apt sources), so `apt-get source` works without naming a mirror.
With --mirror, prints only the archive's URI and suite (for debootstrap)."""
import glob
import sys


def stanzas():
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for block in open(path).read().split("\n\n"):
            fields = {}
            for line in block.splitlines():
                if line.startswith("#") or ": " not in line:
                    continue
                key, value = line.split(": ", 1)
                fields[key] = value
            if fields:
                yield fields
    try:
        lines = open("/etc/apt/sources.list").read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "deb" and not parts[1].startswith("["):
            yield {"Types": "deb", "URIs": parts[1], "Suites": parts[2], "Components": " ".join(parts[3:])}


for fields in stanzas():
    if "deb" not in fields.get("Types", "").split() or "security" in fields.get("URIs", ""):
        continue
    if sys.argv[1:] == ["--mirror"]:
        print(fields["URIs"], fields["Suites"].split()[0])
        sys.exit(0)
    print("Types: deb-src")
    print("URIs: " + fields["URIs"])
    print("Suites: " + fields["Suites"].split()[0])
    print("Components: " + fields.get("Components", "main"))
    if "Signed-By" in fields:
        print("Signed-By: " + fields["Signed-By"])
    sys.exit(0)
sys.exit("no Debian archive among the apt sources")
