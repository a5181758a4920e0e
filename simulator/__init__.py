"""Discrete-event simulation of a Plan: the planner's op programs served by the machine's resources in dependency
order, with staging buffers, interleaved batches, speculative rounds and KV growth. ``simulate(plan)`` is the entry
point; ``core`` is the scheduler, ``script`` turns a plan into stages, ``report`` summarises a schedule."""

from specplan.simulator.simulation import Simulation, simulate

__all__ = ["Simulation", "simulate"]
