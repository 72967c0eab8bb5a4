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
