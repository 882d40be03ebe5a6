{{/* The labels every object carries, and the ones its pods are selected by. */}}
{{- define "taskcred.selector" -}}
app.kubernetes.io/name: taskcred
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "taskcred.labels" -}}
{{ include "taskcred.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "taskcred.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}
{{- end }}

{{/* The issuer URL: as given, or the Ingress's HTTPS URL. */}}
{{- define "taskcred.issuerUrl" -}}
{{- if .Values.issuerUrl -}}
{{- if and .Values.ingress.enabled (ne (urlParse .Values.issuerUrl).host .Values.ingress.host) -}}
{{ fail (printf "issuerUrl names the host %s but the Ingress serves %s: verifiers would fetch the keys from a host this release does not serve" (urlParse .Values.issuerUrl).host .Values.ingress.host) }}
{{- end -}}
{{ .Values.issuerUrl }}
{{- else if .Values.ingress.enabled -}}
https://{{ .Values.ingress.host }}
{{- else -}}
{{ fail "set issuerUrl (the HTTPS URL verifiers fetch the JWK Set from), or enable the Ingress" }}
{{- end -}}
{{- end }}
