"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

Imported only by ``alignserve serve --replicas N`` (plain ``alignserve serve`` never imports
Ray). ``work``: what a request costs and which replica takes it (no Ray); ``replica``: the
Serve deployment owning one engine; ``ingress``: the HTTP front; ``launch``: the wiring.
"""
