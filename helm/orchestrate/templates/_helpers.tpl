{{/* The chart name, overridable. */}}
{{- define "orchestrate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The base name of every object. A release named like the chart ("orchestrate") gives
the same names as k8s/: orchestrate, orchestrate-config, orchestrate-release, ...
Truncated to 44 characters so that "<name>-release" fits a CronJob's 52.
*/}}
{{- define "orchestrate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 44 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 44 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 44 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "orchestrate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "orchestrate.labels" -}}
helm.sh/chart: {{ include "orchestrate.chart" . }}
{{ include "orchestrate.selectorLabels" . }}
app.kubernetes.io/part-of: orchestrate
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "orchestrate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "orchestrate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "orchestrate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespace of the routed object: router.namespace, else the release's. */}}
{{- define "orchestrate.routerNamespace" -}}
{{- default .Release.Namespace .Values.router.namespace }}
{{- end }}

{{/* The router section of release.yaml, as YAML, from the router values. */}}
{{- define "orchestrate.routerConfig" -}}
{{- $r := .Values.router }}
{{- $out := dict "kind" $r.kind "namespace" (include "orchestrate.routerNamespace" .) "timeout" $r.timeout }}
{{- if eq $r.kind "gateway" }}
{{- $out = merge $out $r.gateway }}
{{- else if eq $r.kind "ingress-nginx" }}
{{- $out = merge $out $r.ingressNginx }}
{{- else if eq $r.kind "service" }}
{{- $out = merge $out $r.service }}
{{- else }}
{{- fail (printf "router.kind must be gateway, ingress-nginx or service, not %q" $r.kind) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The RBAC rule for the routed object: its resource, pinned to its name by
resourceNames, verbs get and patch only.
*/}}
{{- define "orchestrate.routerRule" -}}
{{- $r := .Values.router }}
{{- if eq $r.kind "gateway" }}
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  resourceNames: [{{ required "router.gateway.route is required" $r.gateway.route | quote }}]
  verbs: ["get", "patch"]
{{- else if eq $r.kind "ingress-nginx" }}
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  resourceNames: [{{ required "router.ingressNginx.canary_ingress is required" $r.ingressNginx.canary_ingress | quote }}]
  verbs: ["get", "patch"]
{{- else if eq $r.kind "service" }}
- apiGroups: [""]
  resources: ["services"]
  resourceNames: [{{ required "router.service.service is required" $r.service.service | quote }}]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}

{{- define "orchestrate.configMapRule" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames: [{{ printf "%s-config" (include "orchestrate.fullname" .) | quote }}]
  verbs: ["get"]
{{- end }}

{{/* Environment shared by the release job and the webhook. */}}
{{- define "orchestrate.env" -}}
- name: ORCHESTRATE_BLUE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.bluePasswordKey }}
- name: ORCHESTRATE_GREEN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.greenPasswordKey }}
- name: ORCHESTRATE_LOG_FORMAT
  value: json
# The root filesystem is read-only: anything wanting a home directory gets /tmp.
- name: HOME
  value: /tmp
{{- end }}

{{/* Pod-level settings shared by the release job and the webhook. */}}
{{- define "orchestrate.podSettings" -}}
serviceAccountName: {{ include "orchestrate.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
