"""The peer's web dashboard, served by the control API on loopback (see docs/DASHBOARD.md).

``sessions`` holds one-time login codes and browser sessions; ``pages`` renders the
Jinja2 pages and streams live updates. Everything shown comes from the
:class:`~silomesh.peer.operator.Operator`; every action calls the control API's JSON
routes from the browser, so the dashboard can do exactly what the API can.
"""
