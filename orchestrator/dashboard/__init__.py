"""The live terminal dashboard (`orch dashboard`) and the table `orch status` shares.

`snapshot` reads the store into plain dataclasses, `render` turns a snapshot into a rich
renderable (pure: no I/O, no clock), `app` is the refresh loop and keyboard handling.
"""
