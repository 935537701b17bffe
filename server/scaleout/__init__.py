"""fitserve on Ray Serve: an OpenAI-compatible ingress in front of N engine replicas.

Optional (`pip install 'fitserve[ray]'`). Only the modules that need Ray import it, and only this package
does: `routing`, `autoscale` and `budget` are plain Python, unit-tested without Ray; `router`, `replica`,
`ingress`, `app` and `launch` are the Ray Serve adapters around them.
"""
