"""Files and folders that are complete or absent: written aside under a temporary name, then renamed into
place (a rename within one filesystem is atomic), so a crash never leaves one that only looks finished."""

import os
import shutil
from pathlib import Path


def replace_atomically(path: Path, write_to) -> None:
    """Call `write_to(temporary_path)`, make it durable (fsync), then rename it to `path`: a crash never leaves a
    file that looks done. The temporary is `NAME.tmp` beside `path`: one a killed writer left is overwritten, and
    one this call leaves on failure is removed."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write_to(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: Path, write) -> None:
    """Call `write(file)` on a temporary name, then rename (above)."""

    def write_to(temporary):
        with open(temporary, "wb") as file:
            write(file)

    replace_atomically(path, write_to)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode()))


def staging_dir(destination: Path, clear: bool = True) -> Path:
    """Where the folder `destination` is written until it is complete: `NAME.tmp` beside it (one filesystem,
    so the final rename is atomic), emptied of anything an interrupted writer left. When several processes
    write into it, only the main one clears it (`clear`), before the others start."""
    staging = destination.with_name(destination.name + ".tmp")
    if clear:
        shutil.rmtree(staging, ignore_errors=True)
    return staging


def put_in_place(staging: Path, destination: Path) -> None:
    """Replace `destination` with the complete folder `staging`: the old one goes only once the new one is whole."""
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)
