"""fitserve's load tester: drives any OpenAI-compatible server over HTTP (imports nothing from server/ or quant/).

Modules: workload (what is sent), client (streaming HTTP + timings), scrape (fitserve /metrics), sweep (levels
and the --find-max-batch search), verdict (why a level fails), report (table, JSON, CSV, plots), cli.
"""
