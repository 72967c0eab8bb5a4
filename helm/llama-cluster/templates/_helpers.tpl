{{- define "llama-cluster.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "llama-cluster.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llama-cluster.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* OTLP/gRPC endpoint of the nodes: otel.endpoint, else the chart's Jaeger, else off (""). */}}
{{- define "llama-cluster.otlpEndpoint" -}}
{{- if .Values.otel.endpoint -}}
{{ .Values.otel.endpoint }}
{{- else if .Values.otel.jaeger.enabled -}}
http://{{ include "llama-cluster.fullname" . }}-jaeger:4317
{{- end -}}
{{- end -}}

{{/* Where the Secrets are mounted (files the nodes' *_file options name). */}}
{{- define "llama-cluster.secretDir" -}}
/var/run/secrets/llama-cluster
{{- end -}}

{{/* Name the coordinator checks in every worker's certificate. */}}
{{- define "llama-cluster.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s-workers" (include "llama-cluster.fullname" .)) -}}
{{- end -}}

{{/* Whether a node mounts any Secret ("node": a swarm member, which reads the cluster key). */}}
{{- define "llama-cluster.hasSecrets" -}}
{{- $v := .root.Values -}}
{{- if or $v.auth.adminTokenSecret $v.auth.apiTokenSecret $v.tls.secretName (and .node $v.clusterKey.secretName) }}true{{ end -}}
{{- end -}}

{{/* Secret volumes of a node: the tokens, the cluster key, the TLS certificate. */}}
{{- define "llama-cluster.secretVolumes" -}}
{{- $v := .root.Values -}}
{{- with $v.auth.adminTokenSecret }}
- name: admin-token
  secret: {secretName: {{ . | quote }}, items: [{key: token, path: token}]}
{{- end }}
{{- with $v.auth.apiTokenSecret }}
- name: api-token
  secret: {secretName: {{ . | quote }}, items: [{key: token, path: token}]}
{{- end }}
{{- if and .node $v.clusterKey.secretName }}
- name: cluster-key
  secret: {secretName: {{ $v.clusterKey.secretName | quote }}, items: [{key: key, path: key}]}
{{- end }}
{{- with $v.tls.secretName }}
- name: tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
{{- end -}}

{{/* Their mounts. */}}
{{- define "llama-cluster.secretMounts" -}}
{{- $v := .root.Values -}}
{{- $dir := include "llama-cluster.secretDir" .root -}}
{{- if $v.auth.adminTokenSecret }}
- {name: admin-token, mountPath: {{ $dir }}/admin-token, readOnly: true}
{{- end }}
{{- if $v.auth.apiTokenSecret }}
- {name: api-token, mountPath: {{ $dir }}/api-token, readOnly: true}
{{- end }}
{{- if and .node $v.clusterKey.secretName }}
- {name: cluster-key, mountPath: {{ $dir }}/cluster-key, readOnly: true}
{{- end }}
{{- if $v.tls.secretName }}
- {name: tls, mountPath: {{ $dir }}/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* The environment pointing the nodes' *_file options at the mounted files. */}}
{{- define "llama-cluster.secretEnv" -}}
{{- $v := .root.Values -}}
{{- $dir := include "llama-cluster.secretDir" .root -}}
{{- if $v.auth.adminTokenSecret }}
- {name: LLAMA_CLUSTER_ADMIN_TOKEN_FILE, value: {{ $dir }}/admin-token/token}
{{- end }}
{{- if $v.auth.apiTokenSecret }}
- {name: LLAMA_CLUSTER_API_TOKEN_FILE, value: {{ $dir }}/api-token/token}
{{- end }}
{{- if and .node $v.clusterKey.secretName }}
- {name: LLAMA_CLUSTER_KEY_FILE, value: {{ $dir }}/cluster-key/key}
{{- end }}
{{- if $v.tls.secretName }}
- {name: LLAMA_CLUSTER_TLS_CERT_FILE, value: {{ $dir }}/tls/tls.crt}
- {name: LLAMA_CLUSTER_TLS_KEY_FILE, value: {{ $dir }}/tls/tls.key}
{{- if not .node }}
- {name: LLAMA_CLUSTER_TLS_CA_FILE, value: {{ $dir }}/tls/ca.crt}
- {name: LLAMA_CLUSTER_TLS_SERVER_NAME, value: {{ include "llama-cluster.tlsServerName" .root | quote }}}
{{- end }}
{{- end }}
{{- end -}}
