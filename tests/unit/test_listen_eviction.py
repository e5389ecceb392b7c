"""Which pending connection a full receiver drops (pyxl.migrate.listener.pick_evictee).

The rule: only the source address holding the most pending connections is a
candidate; among its connections the least advanced goes (silent < in its
TLS handshake < authenticated or part of a head read), the oldest among equals.
A flood of cheap connections therefore pushes out its own, never a sender that
has made progress while a silent one is pending.
"""

from __future__ import annotations

from pyxl.migrate.listener import SECURING, SILENT, TALKING, pick_evictee

A, B = "127.0.0.1", "192.0.2.7"


def test_the_oldest_silent_one_goes_not_the_sender_in_tls():
    # the real sender (oldest, in its handshake) among silent flood peers, one source
    pending = [(A, SECURING)] + [(A, SILENT)] * 7
    assert pick_evictee(pending) == 1


def test_an_authenticated_sender_outlives_handshaking_peers():
    pending = [(A, TALKING), (A, SECURING), (A, SECURING), (A, SILENT)]
    assert pick_evictee(pending) == 3
    assert pick_evictee(pending[:3]) == 1


def test_the_oldest_among_equals():
    assert pick_evictee([(A, SECURING)] * 4) == 0
    assert pick_evictee([(A, TALKING), (A, SILENT), (A, SILENT)]) == 1


def test_the_busiest_source_pays_even_for_a_less_advanced_peer_elsewhere():
    # B floods with handshakes; A's one silent connection (just connected) stays
    pending = [(B, SECURING), (A, SILENT), (B, SECURING), (B, TALKING)]
    assert pick_evictee(pending) == 0


def test_sources_tied_for_most_are_all_candidates():
    pending = [(A, TALKING), (B, SECURING), (A, SECURING), (B, SILENT)]
    assert pick_evictee(pending) == 3
    assert pick_evictee([(A, SILENT)]) == 0
