# PyInstaller runtime hook: runs in the frozen program before gridx.py.
#
# When $TMPDIR (or /tmp) is mounted noexec, the static bootloader
# (packaging/staticx-bootloader.patch) unpacks into another folder and sets
# TMPDIR to it so that PyInstaller unpacks there too; it records the original
# value in STATICX_TMPDIR_ORIG, or STATICX_TMPDIR_UNSET=1 when there was none.
# Put it back, so that gridx.py and the commands it runs see the host's TMPDIR.
import os

if os.environ.pop("STATICX_TMPDIR_UNSET", None):
    os.environ.pop("TMPDIR", None)
elif "STATICX_TMPDIR_ORIG" in os.environ:
    os.environ["TMPDIR"] = os.environ.pop("STATICX_TMPDIR_ORIG")
