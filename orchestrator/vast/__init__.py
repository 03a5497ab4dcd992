"""Vast.ai: a typed REST client, offer selection, provisioning (`orch up`/`orch down`), cost and
preemption checks.

    client.py     VastClient (httpx), Offer / Instance models, API-key lookup
    offers.py     pure: VastOffer config -> search query; rank offers; bid; one-line summary
    provision.py  up(): search, create, wait, attach key, ssh, pin host key, bootstrap; down()
    cost.py       spend per instance and per run; idle detection and the idle policy
    provider.py   check_instance(): is an unreachable instance outbid, stopped or gone?

The API key comes from `VAST_API_KEY` or the official CLI's key files; it lives only in the
client's Authorization header and never reaches argv, logs, the store or the rented box.
"""
