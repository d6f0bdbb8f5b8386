"""The chat agent: a dialog tree, long-term memory, reflection, an emotion loop, tasks,
tools and a model cascade, on any LLM adapter.

- :mod:`engine.agent.dialog`: the persisted dialog tree (branches, export);
- :mod:`engine.agent.long_term` and :mod:`engine.agent.embedding`: memories with embeddings
  in the memory store, retrieved by recency, importance and relevance;
- :mod:`engine.agent.affect`: arousal/valence labels, parsed leniently, pinnable;
- :mod:`engine.agent.cascade`: each step to a small model first, deferring to a larger one;
- :mod:`engine.agent.tools` and :mod:`engine.agent.sandbox`: the agent's tools;
- :mod:`engine.agent.state`: tasks, rolling summaries and reflection bookkeeping;
- :mod:`engine.agent.agent`: one turn of the loop, as a stream of events.
"""
