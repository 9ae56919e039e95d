"""Names of the server's RPCs over hivemind P2P, and their message types.

    swarm.info        unary   InfoRequest -> InfoResponse
    swarm.forward     stream  frames of ForwardRequest -> frames of ForwardResponse
    swarm.inference   stream  frames of InferenceRequest (open, step...) -> frames of InferenceResponse
    swarm.backward    stream  frames of BackwardRequest -> frames of BackwardResponse
    swarm.push        unary   PushRequest -> PushResponse (server to server: a step into the next hop's session)
    swarm.adapter_fetch stream AdapterFetchRequest -> frames of AdapterFetchResponse (a slice of a held adapter)
    swarm.adapter_store stream frames of AdapterStoreRequest -> frames of AdapterStoreResponse (publishing)
    swarm.reachability unary ReachabilityRequest -> ReachabilityResponse (served by public peers, see swarm/reachability.py)
    swarm.fetch       stream  frames of one FetchRequest -> frames of FetchChunks (a model's files, see swarm/fetch/)
"""

RPC_INFO = "swarm.info"
RPC_FORWARD = "swarm.forward"
RPC_INFERENCE = "swarm.inference"
RPC_BACKWARD = "swarm.backward"
RPC_REACHABILITY = "swarm.reachability"
RPC_PUSH = "swarm.push"
RPC_FETCH = "swarm.fetch"
RPC_ADAPTER_FETCH = "swarm.adapter_fetch"
RPC_ADAPTER_STORE = "swarm.adapter_store"
