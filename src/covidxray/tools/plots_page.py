"""`python -m covidxray.tools.plots_page MANIFEST TARBALLS OUT`: the HTML template that `dvc plots
show` fills (.dvc/config: plots.html_template), with Vega, Vega-Lite and vega-embed inlined from
the npm tarballs listed in MANIFEST (checked by sha256), so the page draws offline. DVC's own page
loads the three scripts from a CDN and stays blank without the network.

DVC replaces `{plot_divs}` (and `{refresh_tag}`) in the template; a template without `{scripts}`
keeps DVC from adding its CDN tags.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tarfile
from pathlib import Path

from covidxray import CovidXrayError

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- offline: Vega, Vega-Lite and vega-embed inlined by covidxray.tools.plots_page -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def read_manifest(manifest: Path) -> dict[str, str]:
    """{tarball name: sha256} from a sha256sum-style manifest ('#' lines are comments)."""
    lines = [line.split() for line in manifest.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {name: digest for digest, name in lines}


def npm_specs(manifest: Path) -> list[str]:
    """The `npm pack` arguments of the manifest's tarballs: vega-lite-5.2.0.tgz -> vega-lite@5.2.0."""
    specs = []
    for name in read_manifest(manifest):
        found = re.fullmatch(r"(.+)-(\d+\.\d+\.\d+)\.tgz", name)
        if not found:
            raise CovidXrayError(f"{manifest}: {name} is not an npm tarball name (NAME-X.Y.Z.tgz)")
        specs.append(f"{found[1]}@{found[2]}")
    return specs


def bundled_script(tarball: Path, digest: str) -> str:
    """The package's build/<name>.min.js from its npm tarball, after checking the tarball's sha256."""
    data = tarball.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CovidXrayError(f"{tarball}: sha256 differs from the manifest (a different or damaged download)")
    package = re.fullmatch(r"(.+)-\d+\.\d+\.\d+\.tgz", tarball.name)[1]
    with tarfile.open(tarball) as archive:
        source = archive.extractfile(f"package/build/{package}.min.js").read().decode("utf-8")
    # "</script" inside an inline script would end it early; "<\/" means the same in JavaScript
    return "<script>\n" + source.replace("</script", "<\\/script") + "\n</script>"


def write_page(manifest: Path, tarballs: Path, out: Path) -> Path:
    """The offline template at `out`, the scripts in the manifest's order (vega, vega-lite, vega-embed)."""
    scripts = [bundled_script(tarballs / name, digest) for name, digest in read_manifest(manifest).items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(PAGE % "\n".join(scripts), encoding="utf-8")
    partial.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """`plots_page MANIFEST TARBALLS OUT` writes the page; `plots_page --npm-specs MANIFEST` prints
    what `npm pack` fetches."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["--npm-specs"]:
            print(" ".join(npm_specs(Path(args[1]))))
        else:
            manifest, tarballs, out = (Path(a) for a in args)
            print(f"plots page: {write_page(manifest, tarballs, out)}")
    except CovidXrayError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
