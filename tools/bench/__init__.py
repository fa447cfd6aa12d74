"""The benchmark behind ``scripts/bench`` (docs/performance.md): the gateway as shipped and
stripped, against nginx and the gunicorn/gevent floor, in interleaved rounds.

``run`` starts the processes and drives the load; ``report`` turns the results into the table
and the target check; ``chart`` draws docs/performance.png; ``nginx`` writes nginx's
configuration; ``wrk`` holds wrk's Lua script; ``meter`` reads CPU and memory from /proc;
``profile`` summarises py-spy stacks. ``backend``, ``floor_app``, ``sse_client`` and
``slow_reader`` run as processes of their own.
"""
