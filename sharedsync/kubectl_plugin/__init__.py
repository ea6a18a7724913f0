"""``kubectl sharedsync``: the day-2 view and actions on SharedVolumes from a user's terminal.

A thin layer over what the operator already defines (operator/API.md): it reads SharedVolume
status and sets the day-2 annotations, and with ``--wait`` watches the status the operator
writes back. It never talks to agents and decides nothing itself, so it cannot disagree with the
operator. Installed as the ``kubectl-sharedsync`` executable, which kubectl finds on PATH.
"""
