"""Run staticx on the PyInstaller output, reproducibly, with our bootloader.

    .venv-build/bin/python packaging/staticx_build.py --bootloader BOOTLOADER \
        [--compress] INPUT OUTPUT

staticx packs the program and its libraries into a tar archive whose headers
carry each file's mtime, owner and mode; several of those files are
temporary copies made during the run, so two runs differ. Every header is
normalised here (mtime = SOURCE_DATE_EPOCH, owner root:root) before it is
written. The bootloader asset is replaced with the one built from
packaging/staticx-bootloader.patch. Everything else is staticx's own
generate(), with --strip.
"""

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile


def pin_tar_headers(epoch):
    original_addfile = tarfile.TarFile.addfile

    def addfile(self, tarinfo, fileobj=None):
        tarinfo.mtime = epoch
        tarinfo.uid = tarinfo.gid = 0
        tarinfo.uname = tarinfo.gname = "root"
        return original_addfile(self, tarinfo, fileobj)

    tarfile.TarFile.addfile = addfile


def use_bootloader(path):
    import staticx.api

    original = staticx.api.copy_asset_to_tempfile

    def copy_asset_to_tempfile(assetname, debug, **kwargs):
        if assetname != "bootloader":
            return original(assetname, debug, **kwargs)
        handle = tempfile.NamedTemporaryFile(**kwargs)
        with open(path, "rb") as source:
            shutil.copyfileobj(source, handle)
        handle.flush()
        handle.seek(0)
        return handle

    staticx.api.copy_asset_to_tempfile = copy_asset_to_tempfile


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootloader", required=True, help="staticx bootloader to use")
    parser.add_argument("--compress", action="store_true", help="xz-compress the archive (slower start)")
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args()

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch or not epoch.isdigit():
        sys.exit("error: SOURCE_DATE_EPOCH must be set (seconds since 1970)")
    logging.basicConfig(level=logging.WARNING, format="staticx: %(message)s")

    pin_tar_headers(int(epoch))
    use_bootloader(args.bootloader)

    import staticx.api
    from staticx.errors import Error

    try:
        staticx.api.generate(args.input, args.output, strip=True, compress=args.compress)
    except Error as error:
        sys.exit(f"error: staticx: {error}")
    os.chmod(args.output, 0o755)


if __name__ == "__main__":
    main()
