"""Vast.ai: a typed REST client, offer selection, provisioning (`orch up`/`orch down`), cost and
preemption checks, read against the official client (vast-ai/vast-cli) and the API docs.

    keys.py       the API key, where the official CLI keeps it (VAST_API_KEY, vast_tfa_key, ...)
    client.py     VastClient (httpx): retries, create sent once with 120 s, VAST_URL
    models.py     Offer / Instance rows with nulls as Vast sends them; what a stop means
    offers.py     pure: VastOffer config -> search query; rank offers; bids; expected spend
    ledger.py     every create's unique label, in the store before the request is sent
    records.py    the store's instance rows: record, running stretches, destroy
    reconcile.py  find what a lost create made; orphans (orch's label, no record)
    boot.py       wait for running, the ssh banner and a real command
    provision.py  up(): reconcile, reuse/restart/rebid, search, create, prepare
    teardown.py   down(), down_orphans()
    cost.py       spend per instance and per run; idle detection and the idle policy
    provider.py   check_instance(): is an unreachable instance outbid, stopped or gone?
    relaunch.py   a lost training run relaunched from its newest checkpoint

The API key lives only in the client's Authorization header and never reaches argv, logs, the
store or the rented box.
"""
