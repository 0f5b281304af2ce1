{{- define "kmesh.name" -}}kmesh{{- end -}}
{{- define "kmesh.labels" -}}
app.kubernetes.io/name: kmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "kmesh.selector" -}}
app.kubernetes.io/name: kmesh
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "kmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
