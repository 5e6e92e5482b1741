# OpenBao server config for the 3-node Raft cluster in openbao.yaml. BAO_API_ADDR and
# BAO_CLUSTER_ADDR come from the pod's environment (its own stable DNS name).
ui            = false
# Standbys forward reads to the leader: since OpenBao 2.5 a standby may answer a read itself, from
# state that can lag the leader, so a GetSecret right after a PutSecret could miss the new version.
disable_standby_reads = true

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/openbao/tls/tls.crt"
  tls_key_file    = "/openbao/tls/tls.key"
  tls_min_version = "tls12"
}

storage "raft" {
  path = "/openbao/data"

  retry_join {
    leader_api_addr     = "https://openbao-0.openbao-internal:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
  retry_join {
    leader_api_addr     = "https://openbao-1.openbao-internal:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
  retry_join {
    leader_api_addr     = "https://openbao-2.openbao-internal:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
}
