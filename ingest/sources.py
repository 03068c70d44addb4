"""Finding sources: files and folders (recursive), filtered by include/exclude globs."""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ingest.parsers import SUPPORTED_EXTENSIONS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovery:
    files: list[Path]  # resolved, de-duplicated, in a stable order
    missing: list[str]  # named paths that do not exist
    roots: list[Path]  # the folders that were walked (what --sync mirrors)


def _matches(relative: str, patterns: list[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def discover(paths: list[Path], include: list[str], exclude: list[str]) -> Discovery:
    """Files named directly are always taken (an unsupported one fails later with a reason); folders are walked
    for supported files that pass the globs. Symlinks inside folders are not followed out of the folder."""
    files: dict[Path, None] = {}
    missing: list[str] = []
    roots: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            files[path.resolve()] = None
        elif path.is_dir():
            root = path.resolve()
            roots.append(root)
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                rel_dir = os.path.relpath(folder, root)
                dirs[:] = [d for d in dirs if not _matches(os.path.normpath(os.path.join(rel_dir, d)), exclude)]
                for name in sorted(names):
                    full = Path(folder) / name
                    relative = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
                    if full.suffix.lower() not in SUPPORTED_EXTENSIONS:
                        continue
                    if exclude and _matches(relative, exclude):
                        continue
                    if include and not _matches(relative, include):
                        continue
                    resolved = full.resolve()
                    if full.is_symlink() and root not in resolved.parents:
                        logger.warning("skipping %s: symlink leads outside %s", full, root)
                        continue
                    if resolved.is_file():
                        files[resolved] = None
        else:
            missing.append(str(given))
    return Discovery(list(files), missing, roots)
